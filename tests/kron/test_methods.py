"""The method registry: a fourth compression method is one new module and nothing else.

`BlockDiagonal` below is a complete method written the way a contributor would (a spec, a Method with its own search
options and candidates, a layer) and registered from this test module only. Without touching kron/plan.py, surgery,
save/load, analysis, the search space, the profile or the knapsack, it must work in plan files, compression
reports, saved folders, merging, analysis labels, a search space, a sensitivity profile and an automatic plan.
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
from kron.methods import LINEAR_KINDS, Method, MethodOptions, ModuleSpec, Slot
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


class BlockDiagOptions(MethodOptions):
    """Its search options: the numbers of diagonal blocks offered."""

    ks: list[int] = [2, 4]


class BlockDiagonal(Method):
    name = "blockdiag"
    spec_type = BlockDiagSpec
    options_type = BlockDiagOptions
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

    def candidates(self, m, n, options, span):
        return [BlockDiagSpec(k) for k in options.ks if m % k == 0 and n % k == 0
                and span.min_compression <= k <= (span.max_compression or math.inf)]

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


def test_the_fourth_method_is_searched_profiled_and_planned(blockdiag, tiny_gpt2):
    """Its options and candidates reach a search space (its own section of space.methods, validated by it), a
    sensitivity profile (no data-aware init and no closed form: built with its data-free init and measured) and the
    knapsack's automatic plan, with no other file changed."""
    import copy

    from kron.autoplan import Constraints, auto_plan, parse_budget, resolved_specs
    from kron.calibration import collect_input_stats
    from kron.profile import profile_model
    from kron.surgery import apply_specs
    from search.space import SearchSpace
    from search.space_config import SpaceConfig

    space = SearchSpace.from_model(tiny_gpt2, {"groups": ["ffn_in"], "methods": {"blockdiag": {"ks": [2, 4, 5]}}})
    assert space.choices[0].options == ("bd2", "bd4")  # 5 divides nothing
    params = {c.key: "bd4" for c in space.choices}
    assert space.resolved(params)["transformer.h.0.mlp.c_fc"] == {"diag_blocks": 4}
    assert space.plan_costs(params)["params"] < space.info.params
    with pytest.raises(Exception, match="blockdiag.ks"):
        SpaceConfig(methods={"blockdiag": {"ks": "two"}})
    with pytest.raises(Exception, match="unknown option of method blockdiag"):
        SpaceConfig(methods={"blockdiag": {"k": [2]}})

    g = torch.Generator().manual_seed(0)
    stats = collect_input_stats(tiny_gpt2, [torch.randint(0, 96, (4, 8), generator=g) for _ in range(2)])
    prof = profile_model(tiny_gpt2, stats, methods=["blockdiag", "lowrank"], kl_subset=0,
                         constraints=Constraints(max_compression=8, options={"blockdiag": {"ks": [2, 4]}}))
    entry = prof["matrices"]["transformer.h.1.mlp.c_fc"]
    bd = {c["label"]: c for c in entry["candidates"] if c["method"] == "blockdiag"}
    assert set(bd) == {"blockdiag k2", "blockdiag k4"} and {c["init"] for c in bd.values()} == {None}
    assert 0 < bd["blockdiag k2"]["damage"] < bd["blockdiag k4"]["damage"] < 1.5
    sol = auto_plan(prof, parse_budget("ratio=1.3"), methods=["blockdiag"], damage="proxy")
    assert {o.spec["method"] for o in sol.choice.values() if o.spec != KEEP} == {"blockdiag"}
    plan = CompressionPlan.from_resolved(resolved_specs(sol))
    m = copy.deepcopy(tiny_gpt2)
    rep = apply_specs(m, plan.resolve(m), init="svd")
    assert rep.compression_ratio >= 1.3 and rep.params_after_excluding_output_embedding == sol.cost


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
