"""Bad input through the `kronsearch` CLI: every case exits with status 2 and ONE line on stderr that names the field,
the value and what would be valid; an internal error exits 1 with one line.

Configs are validated before any Ray work: the `search` cases use --dry-run or fail before Ray would start.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from search.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
DEL = object()
TRIAL = {"teacher": "demo", "device": "cpu", "plan": {"preset": "uniform:2"},
         "data": {"source": "teacher-samples", "seq_len": 16, "num_samples": 4, "val_blocks": 2},
         "stage1": {"max_steps": 1, "eval_every": 1, "batch_size": 2}}


def _set(d: dict, dotted: str, value) -> dict:
    d = copy.deepcopy(d)
    node = d
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if value is DEL:
        del node[last]
    else:
        node[last] = value
    return d


class Files:
    """Writes the inputs of one case into the test's folder."""

    def __init__(self, root: Path):
        self.root = root

    def yaml(self, name: str, obj) -> str:
        path = self.root / name
        path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
        return str(path)

    def search(self, dotted: str, value) -> list[str]:
        raw = copy.deepcopy(QUICKSTART)
        raw["search"]["storage"] = str(self.root / "runs")
        raw = _set(raw, dotted, value)
        return ["search", self.yaml("search.yaml", raw), "--dry-run"]

    def trial(self, obj) -> list[str]:
        return ["trial", self.yaml("trial.yaml", obj), "--out", str(self.root / "trial-out")]

    def plan(self, obj) -> list[str]:
        return ["plan", "--model", "config:gpt2", "--plan", self.yaml("plan.yaml", obj)]

    def checkpoint(self, damage) -> str:
        """A tiny compressed checkpoint with `damage(dir)` applied."""
        from transformers import GPT2Config

        cfg = self.root / "tiny.json"
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                   eos_token_id=0).to_json_file(cfg)
        out = self.root / "ckpt"
        assert main(["compress", "--model", f"config:{cfg}", "--plan", "uniform:2", "--out", str(out)]) == 0
        damage(out)
        return str(out)

    def results(self, text: str) -> str:
        trial = self.root / "results" / "trial_1"
        trial.mkdir(parents=True)
        (trial / "trial_summary.json").write_text(text)
        return str(self.root / "results")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


# (id, argv builder, exit status, message fragments)
CASES = [
    # --- search configs
    ("search-missing-file", lambda f: ["search", str(f.root / "nope.yaml"), "--dry-run"], 2,
     ["search config file not found", "nope.yaml"]),
    ("search-unknown-key", lambda f: f.search("space.colour", "red"), 2,
     ["space.colour: unknown key", "valid keys: groups"]),
    ("search-unknown-nested-key", lambda f: f.search("trial.stage1.lrr", 1), 2,
     ["trial.stage1.lrr: unknown key", "valid keys: lr,"]),
    ("search-wrong-type", lambda f: f.search("trial.stage1.max_steps", "many"), 2,
     ["trial.stage1.max_steps", "valid integer", "'many'"]),
    ("search-unknown-group", lambda f: f.search("space.groups", ["attn"]), 2,
     ["space.groups.0", "'attention'", "(got 'attn')"]),
    ("search-empty-space", lambda f: f.search("space.groups", []), 2, ["space: the space is empty"]),
    ("search-budget-impossible", lambda f: f.search("space.budget", {"max_params": 10}), 2,
     ["space.budget.max_params: 10 cannot be met", "cheapest plan of this space has"]),
    ("search-compression-range", lambda f: f.search("space.min_compression", 100), 2,
     ["max_compression 64.0 is below min_compression 100.0"]),
    ("search-no-ranks", lambda f: f.search("space.ranks", []), 2, ["space.ranks", "at least one rank"]),
    ("search-zero-samples", lambda f: f.search("search.num_samples", 0), 2,
     ["search.num_samples", "greater than or equal to 1", "(got 0)"]),
    ("search-unknown-objective", lambda f: f.search("search.objectives", ["quality", "size"]), 2,
     ["search.objectives", "['size']", "valid: ['quality', 'params'"]),
    ("search-missing-teacher-dir", lambda f: f.search("trial.teacher", str(f.root / "no-teacher")), 2,
     ["trial.teacher: local path", "no-teacher' does not exist"]),
    ("search-missing-data-file", lambda f: f.search("trial.data.source", str(f.root / "no.txt")), 2,
     ["trial.data.source: local path", "no.txt' does not exist"]),
    ("search-unsupported-model", lambda f: f.search("trial.teacher", "config:t5-small"), 2,
     ["trial.teacher", "unknown architecture 'config:t5-small'", "known: config:gpt2"]),
    ("search-plan-in-trial", lambda f: f.search("trial.plan", {"preset": "kngpt2"}), 2,
     ["trial.plan: the search chooses the plan"]),
    ("search-storage-is-a-file", lambda f: f.search("search.storage", str(REPO / "README.md")), 2,
     ["search.storage", "exists and is not a directory"]),
    ("search-lr-infinite", lambda f: f.search("trial.stage1.lr", float("inf")), 2,
     ["trial.stage1.lr", "finite number"]),
    ("search-max-compression-nan", lambda f: f.search("space.max_compression", float("nan")), 2,
     ["space.max_compression", "finite number"]),
    ("plan-budgets-empty-item", lambda f: ["plan", "--model", "demo", "--auto", "--budgets", "ratio=1.5,,ratio=2",
                                           "--profile", str(REPO / "tests" / "fixtures" / "v0_2" / "profile" /
                                                            "profile.json")], 2,
     ["--budgets 'ratio=1.5,,ratio=2': item 2 is empty"]),
    ("plan-budget-overflow", lambda f: ["plan", "--model", "demo", "--auto", "--budget", "params=1e400"], 2,
     ["budget 'params=1e400': must be a positive size"]),
    ("search-seed-size-overflow", lambda f: f.search("search.seed_plans", ["auto@1e400"]), 2,
     ["search.seed_plans", "'auto@1e400': an automatic plan's size must be a finite number"]),
    ("search-asha-grace", lambda f: f.search("search.asha", {"grace_period": 100}), 2,
     ["search.asha.grace_period 100 exceeds max_t 40"]),
    ("search-missing-section", lambda f: f.search("trial", DEL), 2, ["trial: required field missing"]),
    ("search-bad-name", lambda f: f.search("name", "../up"), 2, ["name:", "letters, digits", "'../up'"]),
    ("search-corrupt-yaml", lambda f: ["search", f.yaml("s.yaml", "name: x\ntrial: {teacher: demo\n  data: ["),
                                       "--dry-run"], 2, ["s.yaml: not valid YAML"]),
    ("search-yaml-not-a-mapping", lambda f: ["search", f.yaml("s.yaml", "- 1\n"), "--dry-run"], 2,
     ["expected a mapping of search settings (keys name, trial, space, search), got list"]),
    ("search-teacher-only-pickle", lambda f: f.search("trial.teacher", _pickle_only_model(f)), 2,
     ["trial.teacher: model directory", "has only pytorch_model.bin; kronsearch reads safetensors only"]),
    ("search-corpus-dir-without-splits", lambda f: f.search("trial.data.source", _empty_dir(f)), 2,
     ["trial.data.source: no 'train' split in directory", "looked for train.txt"]),
    ("search-unknown-glue-task", lambda f: f.search("trial.glue", {"task": "sst3"}), 2,
     ["trial.glue.task: unknown GLUE task 'sst3'; valid: cola, sst2"]),
    ("search-resume-nothing", lambda f: ["search", f.search("name", "fresh")[1], "--resume"], 2,
     ["--resume: nothing to resume", "fresh"]),
    ("search-binary-file", lambda f: ["search", _binary(f), "--dry-run"], 2,
     ["bin.yaml: not a text file (YAML expected"]),
    # --- trial configs
    ("trial-binary-file", lambda f: ["trial", _binary(f)], 2, ["bin.yaml: not a text file (YAML expected"]),
    ("trial-not-a-mapping", lambda f: ["trial", f.yaml("t.yaml", "- 1\n")], 2,
     ["t.yaml: expected a mapping of trial settings, got list"]),
    ("trial-unknown-key", lambda f: f.trial({**TRIAL, "foo": 1}), 2,
     ["foo: unknown key (got 1); valid keys: name, teacher"]),
    ("trial-unknown-preset", lambda f: f.trial({**TRIAL, "plan": {"preset": "kngpt3"}}), 2,
     ["unknown preset 'kngpt3'", "presets: kngpt2"]),
    ("trial-two-plan-sources", lambda f: f.trial({**TRIAL, "plan": {"preset": "kngpt2", "file": "x.yaml"}}), 2,
     ["plan:", "give exactly one of preset, file or rules"]),
    ("trial-missing-plan-file", lambda f: f.trial({**TRIAL, "plan": {"file": str(f.root / "p.yaml")}}), 2,
     ["plan file", "p.yaml does not exist"]),
    ("trial-bad-dtype", lambda f: f.trial({**TRIAL, "dtype": "float8"}), 2,
     ["dtype: Input should be 'float32' or 'bfloat16'", "'float8'"]),
    ("trial-trust-remote-code-type", lambda f: f.trial({**TRIAL, "trust_remote_code": "yes please"}), 2,
     ["trust_remote_code", "valid boolean", "'yes please'"]),
    ("trial-set-without-value", lambda f: f.trial(TRIAL) + ["--set", "stage1.max_steps"], 2,
     ["--set expects KEY=VALUE, got 'stage1.max_steps'"]),
    ("trial-set-unknown-key", lambda f: f.trial(TRIAL) + ["--set", "stage1.foo=3"], 2,
     ["stage1.foo: unknown key", "valid keys here: lr,"]),
    # --- plans and shapes
    ("plan-unknown-rule-key", lambda f: f.plan({"rules": [{"select": "h.0.mlp.c_fc", "a_shape": [7, 5]}]}), 2,
     ["rule 1: unknown key 'a_shape' (did you mean 'shape'?)"]),
    ("plan-shape-does-not-divide", lambda f: f.plan({"rules": [{"select": "h.0.mlp.c_fc", "shape": [7, 5, 1, 1]}]}),
     2, ["module transformer.h.0.mlp.c_fc", "cannot take shape [7, 5, 1, 1]", "need m1·m2 = 3072",
         "valid shapes [m1, n1, m2, n2] nearest"]),
    ("plan-corrupt-yaml", lambda f: f.plan("rules: [\n  - {select: 'h.0.attn.c_attn'"), 2,
     ["plan.yaml: not valid YAML/JSON"]),
    ("plan-binary-file", lambda f: ["plan", "--model", "config:gpt2", "--plan", _binary(f)], 2,
     ["bin.yaml: not a text plan file"]),
    ("plan-unknown-top-key", lambda f: f.plan({"rules": [], "foo": 2}), 2,
     ["plan: unknown key 'foo'; valid keys: version, name"]),
    ("plan-preset-for-other-model", lambda f: ["plan", "--model", "config:gpt2", "--preset", "kroneckerbert8"], 2,
     ["preset 'kroneckerbert8' is for BERT", "presets for this model: kngpt2"]),
    ("plan-missing-model", lambda f: ["plan", "--model", str(f.root / "no-model"), "--preset", "kngpt2"], 2,
     ["no-model does not exist"]),
    ("shapes-negative", lambda f: ["shapes", "-4", "8"], 2, ["M and N must be positive integers", "-4 x 8"]),
    ("shapes-empty-range", lambda f: ["shapes", "8", "8", "--min-compression", "10", "--max-compression", "2"], 2,
     ["min_compression 10 is above max_compression 2"]),
    # --- corrupt and missing files
    ("checkpoint-truncated", lambda f: ["merge", f.checkpoint(lambda d: _truncate(d / "model.safetensors")),
                                        "--out", str(f.root / "m")], 2, ["model.safetensors is truncated"]),
    ("checkpoint-bit-flip", lambda f: ["merge", f.checkpoint(lambda d: _flip(d / "model.safetensors")),
                                       "--out", str(f.root / "m")], 2,
     ["model.safetensors is corrupt: its sha256 does not match"]),
    ("checkpoint-plan-truncated", lambda f: ["merge", f.checkpoint(lambda d: _truncate(d / "plan.yaml")),
                                             "--out", str(f.root / "m")], 2, ["plan.yaml is corrupt"]),
    ("checkpoint-info-truncated", lambda f: ["merge", f.checkpoint(lambda d: _truncate(d / "kronsearch.json")),
                                             "--out", str(f.root / "m")], 2,
     ["kronsearch.json is corrupt or truncated"]),
    ("model-weights-truncated", lambda f: ["eval", "--model", _merged_truncated(f), "--data", str(REPO / "README.md"),
                                           "--tokenizer", str(REPO / "kron" / "demo_teacher")], 2,
     ["model.safetensors is truncated or corrupt"]),
    ("merge-missing-dir", lambda f: ["merge", str(f.root / "no-ckpt"), "--out", str(f.root / "m")], 2,
     ["compressed-model directory", "no-ckpt does not exist"]),
    ("summary-truncated", lambda f: ["analyze", f.results('{"schema": "kronsearch.trial/1", "trial_'),
                                     "--out", str(f.root / "a")], 2,
     ["trial_1/trial_summary.json: truncated or corrupt JSON"]),
    ("summary-bad-status", lambda f: ["analyze", f.results(json.dumps(
        {"schema": "kronsearch.trial/1", "trial_id": "t", "method": "kronecker", "status": "exploded",
         "quality_name": "val_ppl", "quality_mode": "min"})), "--out", str(f.root / "a")], 2,
     ["unknown status 'exploded'; expected one of ['complete'"]),
    ("analyze-missing-results", lambda f: ["analyze", str(f.root / "no-results"), "--out", str(f.root / "a")], 2,
     ["results source", "no-results' does not exist"]),
    ("export-bad-select", lambda f: ["export", f.results("{}"), "--select", "best:foo", "--out", str(f.root / "e")],
     2, ["unknown selection 'best:foo'; expected one of knee, front, best-under-params:N"]),
    ("export-bad-budget", lambda f: ["export", f.results("{}"), "--select", "best-under-params:lots",
                                     "--out", str(f.root / "e")], 2,
     ["cannot read 'lots' as a number; write e.g. 2.5e6"]),
    ("search-meta-corrupt", lambda f: _corrupt_meta(f), 2, ["search_meta.json is truncated or corrupt"]),
    # a profile whose header matches the model but whose matrices do not: a missing matrix was kept dense silently
    ("profile-missing-matrix", lambda f: _profile(f, lambda m: m.pop(_first_linear(m))), 2,
     ["profile.json does not match the model: 1 of the model's matrices have no entry (e.g. transformer.h.0."]),
    ("profile-extra-matrix", lambda f: _profile(f, lambda m: m.update({"transformer.h.9.mlp.c_fc": m[_first_linear(m)]})),
     2, ["does not match the model: 1 entries name no matrix of the model (e.g. transformer.h.9.mlp.c_fc)"]),
    ("profile-entry-incomplete", lambda f: _profile(f, lambda m: m[_first_linear(m)].update(complete=False)), 2,
     ["does not match the model: transformer.h.0.", "is marked incomplete"]),
    ("profile-entry-other-shape", lambda f: _profile(f, lambda m: m[_first_linear(m)].update(m=7)), 2,
     ["does not match the model: transformer.h.0.", "is 7 x"]),
    ("profile-pending", lambda f: _profile(f, lambda m: None, pending=["transformer.h.1.mlp.c_proj"]), 2,
     ["profile.json is incomplete (1 matrices not profiled yet, e.g. transformer.h.1.mlp.c_proj)"]),
]


def _first_linear(matrices: dict) -> str:
    return next(n for n, m in matrices.items() if m.get("group") != "embedding")


def _profile(f: Files, edit, pending=None) -> list[str]:
    """`plan --auto` on a copy of the v0.2 fixture profile and its teacher, the profile's matrices edited."""
    import shutil

    fixtures = REPO / "tests" / "fixtures" / "v0_2"
    teacher = f.root / "teacher"
    shutil.copytree(fixtures / "teacher", teacher)
    data = json.loads((fixtures / "profile" / "profile.json").read_text())
    data["model"]["source"] = str(teacher)
    edit(data["matrices"])
    if pending is not None:
        data["pending"] = pending
    path = f.root / "profile.json"
    path.write_text(json.dumps(data))
    return ["plan", "--model", str(teacher), "--auto", "--profile", str(path), "--budget", "ratio=1.5"]


def _binary(f: Files) -> str:
    path = f.root / "bin.yaml"
    path.write_bytes(bytes(range(128, 256)) * 2)
    return str(path)


def _pickle_only_model(f: Files) -> str:
    d = f.root / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}))
    (d / "pytorch_model.bin").write_bytes(b"never unpickled")
    return str(d)


def _empty_dir(f: Files) -> str:
    d = f.root / "corpus"
    d.mkdir()
    (d / "notes.txt").write_text("no split files here\n")
    return str(d)


def _merged_truncated(f: Files) -> str:
    ckpt = f.checkpoint(lambda d: None)
    out = f.root / "merged"
    assert main(["merge", ckpt, "--out", str(out)]) == 0
    _truncate(out / "model.safetensors")
    return str(out)


def _corrupt_meta(f: Files) -> list[str]:
    argv = f.search("name", "broken")
    exp = f.root / "runs" / "broken"
    exp.mkdir(parents=True)
    (exp / "experiment_state-2000-01-01_00-00-00.json").write_text("{}")
    (exp / "search_meta.json").write_text('{"name": ')
    return [argv[0], argv[1], "--resume"]


@pytest.mark.parametrize("build, status, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_with_one_line(build, status, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KRONSEARCH_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = build(Files(tmp_path))
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == status, err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"kronsearch {argv[0]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_there_are_enough_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_an_internal_error_exits_1_with_one_line(capsys, monkeypatch):
    import kron.factor

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nover two lines")

    monkeypatch.delenv("KRONSEARCH_TRACEBACK", raising=False)
    monkeypatch.setattr(kron.factor, "factor_shapes", broken)
    assert main(["shapes", "8", "8"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["kronsearch shapes: internal error: RuntimeError: something inside broke over two lines "
                     "(set KRONSEARCH_TRACEBACK=1 for the traceback)"]


def test_a_usage_error_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["shapes", "x", "8"])
    assert info.value.code == 2
