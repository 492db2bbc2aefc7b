"""The method registry: a fourth compression method is one new module and nothing else.

`BlockDiagonal` below is a complete method written the way a contributor would (a spec, a Method, a layer) and
registered from this test module only. Without touching kron/plan.py, surgery, save/load or analysis, it must work
in plan files, compression reports, saved folders, merging and analysis labels.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

import pytest
import torch
from torch import nn

from kron import methods
from kron.errors import PlanError
from kron.methods import LINEAR_KINDS, Method, ModuleSpec, Slot
from kron.methods.base import check_keys, positive_int
from kron.methods.layers import FactoredLinear, linear_weight
from kron.plan import KEEP, CompressionPlan


@dataclass(frozen=True)
class BlockDiagSpec(ModuleSpec):
    """W ≈ blockdiag(W_1 .. W_k): the k diagonal blocks of the weight, the rest dropped."""

    k: int
    method: ClassVar[str] = "blockdiag"

    def __post_init__(self):
        positive_int(self.k, "diag_blocks")

    @property
    def kind(self) -> str:
        return "blockdiag"

    def params(self, m: int, n: int) -> int:
        return m * n // self.k

    def macs(self, m: int, n: int) -> int:
        return m * n // self.k

    def describe(self, m=None, n=None) -> str:
        return f"{self.k} diagonal blocks"

    def label(self) -> str:
        return f"blockdiag k{self.k}"

    def option(self) -> str:
        return f"bd{self.k}"

    def compression(self, m=None, n=None) -> float:
        return float(self.k)

    def to_dict(self) -> dict:
        return {"diag_blocks": self.k}

    def check(self, slot: Slot) -> None:
        if slot.m % self.k or slot.n % self.k:
            raise PlanError(f"module {slot.name}: {self.k} blocks do not divide {slot.m} x {slot.n}")

    @classmethod
    def _from_dict(cls, d: Mapping) -> "BlockDiagSpec":
        check_keys(d, ("diag_blocks",), "module spec")
        return cls(k=d["diag_blocks"])


class BlockDiagLinear(FactoredLinear):
    def __init__(self, in_features: int, out_features: int, k: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.D = nn.Parameter(torch.zeros(k, out_features // k, in_features // k, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.init_error = None

    @property
    def macs_per_token(self) -> int:
        return self.D.numel()

    def forward(self, x):
        xs = x.reshape(*x.shape[:-1], self.k, self.in_features // self.k)
        y = torch.einsum("...ki,koi->...ko", xs, self.D).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def to_dense(self):
        return torch.block_diag(*self.D)

    @classmethod
    def _check(cls, out_features, in_features, k, *, what):
        if out_features % k or in_features % k:
            raise PlanError(f"{what}: {k} blocks do not divide it")

    @classmethod
    def _from_weight(cls, weight, bias, k):
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, k, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            rows, cols = out_f // k, in_f // k
            for i in range(k):
                layer.D[i].copy_(weight[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols])
            if bias is not None:
                layer.bias.copy_(bias)
            layer.init_error = ((weight - layer.to_dense()).norm() / weight.norm()).item()
        return layer


class BlockDiagonal(Method):
    name = "blockdiag"
    spec_type = BlockDiagSpec
    module_kinds = LINEAR_KINDS
    primary_keys = ("diag_blocks",)
    option_keys = {}
    alternative = "a block-diagonal weight"
    dict_key = "diag_blocks"
    rule_hint = "diag_blocks"

    def validate_rule(self, options, where):
        positive_int(options["diag_blocks"], f"{where}: diag_blocks")
        return {"diag_blocks": options["diag_blocks"]}

    def spec_for(self, options, slot):
        spec = BlockDiagSpec(options["diag_blocks"])
        spec.check(slot)
        return spec

    def build(self, module, spec, init):
        if init == "svd":
            return BlockDiagLinear.from_linear(module, spec.k)
        out_f, in_f = linear_weight(module)[0].shape
        return BlockDiagLinear(in_f, out_f, spec.k, bias=module.bias is not None, device=module.weight.device,
                               dtype=module.weight.dtype)

    def layer_types(self):
        return (BlockDiagLinear,)

    def recognise(self, module):
        return BlockDiagSpec(module.k) if isinstance(module, BlockDiagLinear) else None

    def parse_label(self, text):
        m = re.fullmatch(r"blockdiag k(\d+)", text)
        return None if m is None else BlockDiagSpec(int(m.group(1)))

    def parse_option(self, text):
        m = re.fullmatch(r"bd(\d+)", text)
        return None if m is None else BlockDiagSpec(int(m.group(1)))


@pytest.fixture
def blockdiag():
    methods.register(BlockDiagonal())
    yield
    methods.unregister("blockdiag")


def test_builtin_methods_are_registered_and_torch_free():
    import subprocess
    import sys

    code = ("import sys, kron.methods as m; assert 'torch' not in sys.modules; "
            "print(','.join(x.name for x in m.all_methods()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = out.strip().split(",")
    assert names[:3] == ["kronecker", "kron_embedding", "lowrank"] and names[-1] == "quant"  # modifiers last


@pytest.mark.parametrize("d", [
    {"shape": [2, 3, 4, 5], "rank": 2, "blocks": 3}, {"embedding_factor": 4}, {"lowrank_rank": 7},
    {"lowrank_rank": 7, "blocks": 3},
])
def test_spec_dicts_labels_and_options_round_trip(d):
    spec = ModuleSpec.from_dict(d)
    assert spec.to_dict() == d and ModuleSpec.from_dict(spec.to_dict()) == spec
    assert methods.parse_label(spec.label()) == spec
    # a search option describes one block; the space adds the block count of fused projections
    one_block = replace(spec, blocks=1) if hasattr(spec, "blocks") else spec
    assert methods.parse_option(spec.option()) == one_block


def test_a_fourth_method_needs_no_change_elsewhere(blockdiag, tiny_gpt2, tmp_path):
    from analysis.results import compression_factor, format_factorisation
    from kron.io import load_compressed, merge, save_compressed
    from kron.surgery import compress

    plan = CompressionPlan([{"select": "mlp.c_fc", "layers": "odd", "diag_blocks": 2},
                            {"select": "attn.c_proj", "shape": [4, 4, 4, 4]}])
    assert CompressionPlan.from_yaml(plan.to_yaml()) == plan
    resolved = plan.resolve(tiny_gpt2)
    assert resolved["transformer.h.1.mlp.c_fc"] == BlockDiagSpec(2)
    assert resolved["transformer.h.0.mlp.c_fc"] == KEEP
    ids = torch.randint(0, tiny_gpt2.config.vocab_size, (2, 7))
    report = compress(tiny_gpt2, plan)
    rec = next(r for r in report.modules if r.name == "transformer.h.1.mlp.c_fc")
    m, n = rec.dense_shape
    assert rec.kind == "blockdiag" and rec.params_after == m * n // 2 + m and rec.macs_after == m * n // 2
    assert "2 diagonal blocks" in report.summary()
    with torch.no_grad():
        before = tiny_gpt2(ids).logits
    out = save_compressed(tiny_gpt2, plan, tmp_path / "model")
    loaded = load_compressed(out, device="cpu")
    assert isinstance(loaded.get_submodule("transformer.h.1.mlp.c_fc"), BlockDiagLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-5, atol=1e-5)
        dense = merge(loaded)
        torch.testing.assert_close(dense(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert type(dense.get_submodule("transformer.h.1.mlp.c_fc")).__name__ == "Conv1D"
    assert format_factorisation({"diag_blocks": 2}) == "blockdiag k2"
    assert compression_factor("blockdiag k2") == 2.0


def test_rule_errors_name_the_new_method(blockdiag):
    with pytest.raises(PlanError) as err:
        CompressionPlan([{"select": "c_fc"}])
    assert "; or, for a block-diagonal weight, one of diag_blocks" in str(err.value)
    with pytest.raises(PlanError, match="unknown key 'diag_block' \\(did you mean 'diag_blocks'\\?\\)"):
        CompressionPlan([{"select": "c_fc", "diag_block": 2}])


def test_registry_refuses_clashing_methods():
    from kron.methods.lowrank import LowRankMethod

    with pytest.raises(ValueError, match="already registered"):
        methods.register(LowRankMethod())


def test_costs_agree_with_the_built_layers(tiny_gpt2):
    """The search space and the plan reports use spec.params/macs; the layers count their own: they agree."""
    from kron.surgery import compress

    plan = CompressionPlan([{"select": "attn.c_attn", "factor": 2, "blocks": 3},
                            {"select": "mlp.c_fc", "lowrank_ratio": 2}, {"select": "wte", "embedding_factor": 2}])
    resolved = {n: s for n, s in plan.resolve(tiny_gpt2).items() if s != KEEP}
    report = compress(tiny_gpt2, plan)
    for rec in report.modules:
        spec = resolved[rec.name]
        m, n = rec.dense_shape
        module = tiny_gpt2.get_submodule(rec.name)
        factors = sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias"))
        assert spec.params(m, n) == factors, rec.name
        assert spec.macs(m, n) == rec.macs_after, rec.name
        assert math.isclose(spec.compression(m, n), m * n / factors), rec.name
