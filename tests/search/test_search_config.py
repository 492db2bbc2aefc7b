"""Search config validation: every error names the field, the bad value and what would be valid."""
from __future__ import annotations

import copy

import pytest
import yaml

from kron.errors import ConfigError
from search.config import load_search_config, smoke_config


def test_valid_config_round_trip(tiny_search, tmp_path):
    raw = tiny_search()
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_search_config(path)
    assert cfg.name == "tiny"
    assert cfg.search.algorithm == "tpe"
    assert cfg.objective_metrics() == (["quality", "params"], ["min", "min"])
    assert cfg.asha_max_t == 6  # defaults to the final stage's max_steps
    assert cfg.search.storage.startswith("/")
    # a dict and a SearchConfig give the same result
    assert load_search_config(cfg).model_dump() == cfg.model_dump()


def _error(raw: dict, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_search_config(raw, **kw)
    return str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("space", "colour"), "red", ["space.colour: unknown key", "valid keys:", "groups", "tie_layers"]),
        (("search", "algorithm"), "bayes", ["search.algorithm", "'tpe'", "'nsga2'", "'random'", "'bayes'"]),
        (("search", "objectives"), ["quality", "speed"], ["search.objectives", "unknown objective", "'speed'",
                                                          "params"]),
        (("search", "objectives"), ["params", "macs"], ["must include 'quality'"]),
        (("search", "objectives"), ["quality"], ["one or two size objectives"]),
        (("search", "num_samples"), 0, ["search.num_samples", "greater than or equal to 1", "got 0"]),
        (("search", "resources", "gpu"), -1, ["search.resources.gpu", "got -1"]),
        (("search", "address"), "cluster", ["search.address", "'auto'", "ray://"]),
        (("space", "groups"), ["attention", "mlp"], ["space.groups", "'ffn_in'", "'mlp'"]),
        (("space", "layers"), "some", ["space.layers", "'free'", "'some'"]),
        (("space", "layers"), [-1, 2], ["space.layers", "0-based", "-1"]),
        (("space", "ranks"), [0, 1], ["space.ranks", "positive", "[0]"]),
        (("space", "embedding_factors"), [1, 2], ["embedding factors must be integers >= 2", "[1]"]),
        (("space", "max_compression"), 1.5, ["max_compression 1.5 is below min_compression 2.0"]),
        (("space", "budget"), {}, ["space.budget", "max_params"]),
        (("space", "budget"), {"max_parameters": 5}, ["space.budget.max_parameters: unknown key", "max_macs"]),
        (("space", "modules"), {"attention": ["c_attn"]}, ["are standard groups"]),
        (("space", "shapes"), {"ffn_out": ["4x4,8x8,r1"]}, ["shapes: 'ffn_out' is not a searched group"]),
        (("name",), "my search", ["name", "letters, digits"]),
        (("trial", "plan"), {"preset": "kngpt2"}, ["trial.plan", "the search chooses the plan"]),
        (("trial", "method"), "lowrank", ["trial.method", "'kronecker'", "'lowrank'"]),
        (("trial", "stage1", "max_step"), 5, ["trial", "stage1.max_step", "unknown key"]),
        (("trial", "teacher"), "./no/such/teacher", ["trial.teacher", "'./no/such/teacher' does not exist"]),
        (("trial", "data", "source"), "../no-such-corpus", ["trial.data.source", "does not exist"]),
        (("search", "asha"), {"grace_period": 50}, ["search.asha.grace_period 50 exceeds max_t 6"]),
        (("search", "asha"), {"grace": 5}, ["search.asha.grace: unknown key", "grace_period"]),
    ],
)
def test_config_errors_name_field_and_value(tiny_search, path, value, expected):
    raw = tiny_search()
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    if path == ("space", "shapes"):
        raw["space"]["groups"] = ["attention", "ffn_in"]
    msg = _error(raw)
    for fragment in expected:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_missing_required_fields():
    msg = _error({"space": {}})
    assert "name: required field missing" in msg and "trial: required field missing" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_search_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_search_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match=r"expected a mapping of search settings \(keys name, trial, space, search\), got int"):
        load_search_config(scalar)


def test_overrides_and_relative_paths(tiny_search, tmp_path, monkeypatch):
    raw = tiny_search()
    monkeypatch.chdir(tmp_path)
    raw["search"]["storage"] = "rel-runs"
    cfg = load_search_config(raw, overrides={"name": "other", "search.num_samples": 3, "search.max_concurrent": None})
    assert cfg.name == "other" and cfg.search.num_samples == 3 and cfg.search.max_concurrent == 2
    assert cfg.search.storage == str(tmp_path / "rel-runs")
    cfg = load_search_config({**raw, "search": {**raw["search"], "storage": "s3://bucket/x"}})
    assert cfg.search.storage == "s3://bucket/x"


def test_budget_numbers_accept_float_spellings(tiny_search):
    raw = tiny_search()
    raw["space"]["budget"] = {"max_params": 2e4, "max_macs": "1.5e4"}
    cfg = load_search_config(raw)
    assert cfg.space.budget.max_params == 20000 and cfg.space.budget.max_macs == 15000


def test_layer_count_and_objective_modes(tiny_search, tmp_path):
    raw = tiny_search()
    raw["space"]["layers"] = {"count": 1}
    raw["search"]["objectives"] = ["quality", "params_excl_output_embedding", "macs"]
    cfg = load_search_config(raw)
    assert cfg.space.layers.count == 1
    assert cfg.objective_metrics() == (["quality", "params_excl_output_embedding", "macs_per_token"],
                                       ["min", "min", "min"])


def test_glue_quality_is_maximised(tiny_search, tmp_path):
    raw = tiny_search()
    raw["trial"]["stage1"] = None
    raw["trial"]["glue"] = {"task": "sst2", "source": "glue"}
    raw["trial"]["stage2"] = {"max_steps": 8, "eval_every": 4}
    cfg = load_search_config(raw)
    assert cfg.objective_metrics()[1] == ["max", "min"]
    assert cfg.asha_max_t == 8


def test_smoke_shrinks_everything(tiny_search):
    raw = tiny_search(num_samples=50, max_concurrent=8, time_budget_minutes=60)
    raw["trial"]["stage1"].update(max_steps=5000, eval_every=500, batch_size=64)
    small = smoke_config(copy.deepcopy(raw))
    assert small["name"] == "tiny-smoke"
    assert small["trial"]["stage1"]["max_steps"] == 4 and small["trial"]["stage1"]["batch_size"] == 2
    assert small["search"]["num_samples"] == 2 and small["search"]["time_budget_minutes"] is None
    cfg = load_search_config(raw, smoke=True)
    assert cfg.asha_max_t == 4 and cfg.search.asha.grace_period == 2
