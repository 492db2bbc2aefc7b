"""Plots render and write non-empty files; their gathered data says what will be drawn."""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from analysis.plots import (
    heatmap_data,
    pareto_plot_data,
    plot_pareto,
    plot_plan_heatmap,
    short_module_name,
)
from analysis.results import load_results, mark_pareto, plan_table
from kron.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results(fake_results):
    return load_results(list(fake_results.values()))


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_pareto_writes_png(results, tmp_path):
    out = plot_pareto(results, out_png=tmp_path / "figs" / "pareto.png", title="fronts")
    assert out == tmp_path / "figs" / "pareto.png" and _is_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pareto.png"]  # no temporary files left


def test_plot_pareto_html_twin(results, tmp_path):
    pytest.importorskip("plotly")
    plot_pareto(results, out_png=tmp_path / "p.png", html_out=tmp_path / "p.html", logy=True)
    html = (tmp_path / "p.html").read_text()
    assert "plotly" in html.lower() and "kron-gpt2-tpe" in html


def test_plot_pareto_without_plotly_warns_and_writes_png(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # makes `import plotly...` raise ImportError
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.warns(UserWarning, match="plotly is not installed"):
        plot_pareto(results, out_png=tmp_path / "p.png", html_out=tmp_path / "p.html")
    assert _is_png(tmp_path / "p.png") and not (tmp_path / "p.html").exists()


def test_pareto_data_skips_failed_trials_and_separates_references(results):
    data = pareto_plot_data(results)
    assert [s.search for s in data.series] == ["kron-gpt2-asha", "kron-gpt2-tpe"]
    asha = data.series[0]
    assert len(asha.x) == 12 and asha.n_trials == 15  # 3 of 15 not complete
    expected_pruned = int(((results["search"] == "kron-gpt2-asha") & (results["status"] == "pruned")).sum())
    assert asha.n_pruned == expected_pruned  # stopped early is not counted as failed in the legend
    assert len({s.colour for s in data.series}) == 2
    assert {r.method for r in data.references} == {"teacher", "preset", "lowrank", "layerdrop"}
    assert data.references[0].method == "teacher"
    assert "lower is better" in data.y_label and "perplexity" in data.y_label
    # the step line runs through the front points in x order
    assert np.all(np.diff(asha.front_x) >= 0) and np.all(np.diff(asha.front_y) <= 0)
    assert len(asha.front_x) == asha.on_front.sum()


def test_pareto_data_front_matches_mark_pareto(results):
    marked = mark_pareto(results)
    data = pareto_plot_data(results)
    for s in data.series:
        expected = marked[(marked["search"] == s.search) & marked["on_front"]]
        assert sorted(s.front_x) == sorted(expected["params"].astype(float))


@pytest.mark.parametrize(
    "references, expected",
    [
        ({"KnGPT2 (paper)": (3.9e6, 140.0)}, "KnGPT2 (paper)"),
        (["kngpt2"], "kngpt2"),
    ],
)
def test_extra_references(results, references, expected, tmp_path):
    data = pareto_plot_data(results, references=references)
    assert expected in [r.label for r in data.references]
    plot_pareto(results, out_png=tmp_path / "p.png", references=references)
    assert _is_png(tmp_path / "p.png")


def test_references_as_dataframe_and_label_picking_a_trial(results, tmp_path):
    kron = results[results["method"] == "kronecker"]
    refs = results[results["method"] != "kronecker"]
    picked = kron[kron["status"] == "complete"]["trial_id"].iloc[0]
    data = pareto_plot_data(kron, references=refs)
    assert len(data.references) == 4
    data = pareto_plot_data(kron, references=[picked])
    assert [r.label for r in data.references] == [picked]
    assert sum(len(s.x) for s in data.series) == (kron["status"] == "complete").sum() - 1


def test_unknown_reference_label_is_an_error(results):
    with pytest.raises(DataError, match="no-such-trial"):
        pareto_plot_data(results, references=["no-such-trial"])


def test_plot_pareto_with_accuracy(write_summary, tmp_path):
    rng = np.random.default_rng(1)
    for i in range(12):
        write_summary(f"glue/t{i}", trial_id=f"t{i}", params=int(rng.uniform(1e6, 9e6)),
                      quality=float(rng.uniform(0.5, 0.9)), quality_name="accuracy", quality_mode="max")
    df = load_results(tmp_path / "glue")
    data = pareto_plot_data(df)
    assert "higher is better" in data.y_label
    assert np.all(np.diff(data.series[0].front_y) >= 0)  # accuracy rises with params along the front
    assert _is_png(plot_pareto(df, out_png=tmp_path / "acc.png", logx=False))


def test_plot_pareto_rejects_mixed_metrics(write_summary, tmp_path):
    write_summary("m/a", trial_id="a", quality_name="accuracy", quality_mode="max", quality=0.8)
    write_summary("m/b", trial_id="b", quality_name="f1", quality_mode="max", quality=0.7)
    with pytest.raises(DataError, match="different quality metrics"):
        plot_pareto(load_results(tmp_path / "m"), out_png=tmp_path / "x.png")


def test_plot_pareto_unknown_column(results, tmp_path):
    with pytest.raises(DataError, match="no column 'flops'"):
        plot_pareto(results, x="flops", out_png=tmp_path / "x.png")


def test_plot_pareto_with_only_failed_trials(write_summary, tmp_path):
    write_summary("f/a", trial_id="a", status="error", quality=None)
    out = plot_pareto(load_results(tmp_path / "f"), out_png=tmp_path / "empty.png")
    assert _is_png(out)


# --- heat map -----------------------------------------------------------------------------------------------


def test_plot_plan_heatmap_writes_png(results, tmp_path):
    marked = mark_pareto(results)
    table = plan_table(marked[marked["on_front"]])
    out = plot_plan_heatmap(table, tmp_path / "heat.png", title="front plans")
    assert _is_png(out)


def test_heatmap_data_groups_by_layer_and_sorts_rows(results):
    complete = results[(results["status"] == "complete") & (results["method"] == "kronecker")]
    table = plan_table(complete)
    data = heatmap_data(table)
    assert data.column_labels[:4] == ["h0.attn.c_attn", "h0.attn.c_proj", "h0.mlp.c_fc", "h0.mlp.c_proj"]
    # columns given out of order are grouped by layer again; within a layer the given order is kept
    reordered = heatmap_data(table[list(reversed(table.columns))])
    assert reordered.layers == sorted(reordered.layers, key=int) and reordered.layers[0] == "0"
    assert reordered.column_labels[:2] == ["h0.mlp.c_proj", "h0.mlp.c_fc"]
    assert data.factors.shape == table.shape
    assert np.all(data.factors[data.keep] == 1.0)
    assert np.all(data.factors[~data.keep] > 0)
    assert "·" in data.row_labels[0] and "ppl" in data.row_labels[0]


def test_heatmap_single_row_and_missing_modules(make_summary, tmp_path):
    a = make_summary(trial_id="a", label="kngpt2", plan_resolved={
        "transformer.wte": "keep", "transformer.h.0.attn.c_attn": {"shape": [192, 384, 2, 1], "rank": 1},
        "lm_head": "keep"})
    b = make_summary(trial_id="b", plan_resolved={"transformer.h.0.attn.c_attn": "keep"})
    table = plan_table([a, b])
    data = heatmap_data(table)
    assert data.column_labels == ["wte", "h0.attn.c_attn", "lm_head"]
    assert np.isnan(data.factors[1, 0])
    assert _is_png(plot_plan_heatmap(plan_table([a]), tmp_path / "one.png"))
    assert _is_png(plot_plan_heatmap(table, tmp_path / "two.png"))


def test_heatmap_cell_kinds(tmp_path):
    """A module a plan does not mention is dense like "keep"; a low-rank entry is not "missing" (its factor needs
    the matrix size, so the cell shows its rank)."""
    table = pd.DataFrame({"h.0.mlp.c_fc": ["keep", "96x384⊗4x4 r1", None, "lowrank r64"]},
                         index=["keep", "kron", "absent", "lowrank"], dtype="string")
    data = heatmap_data(table)
    assert list(data.kinds[:, 0]) == ["keep", "factor", "dense", "lowrank"]
    assert _is_png(plot_plan_heatmap(table, tmp_path / "kinds.png"))


def test_heatmap_of_plain_table(tmp_path):
    table = pd.DataFrame({"h.0.mlp.c_fc": ["keep", "96x384⊗4x4 r1"]}, index=["plan A", "plan B"])
    assert _is_png(plot_plan_heatmap(table, tmp_path / "plain.png"))


def test_empty_heatmap_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        plot_plan_heatmap(plan_table([]), tmp_path / "x.png")


@pytest.mark.parametrize(
    "name, short",
    [
        ("transformer.h.1.attn.c_attn", "h1.attn.c_attn"),
        ("transformer.h.11.mlp.c_proj", "h11.mlp.c_proj"),
        ("bert.encoder.layer.3.attention.self.query", "l3.attention.self.query"),
        ("model.layers.0.self_attn.q_proj", "l0.self_attn.q_proj"),
        ("lm_head", "lm_head"),
    ],
)
def test_short_module_name(name, short):
    assert short_module_name(name) == short


def test_pruned_trials_are_drawn_apart_from_the_front(results, tmp_path):
    """Pruned trials appear (hollow, at the quality they reached when stopped) but never join the front."""
    data = pareto_plot_data(results)
    asha = data.series[0]
    pruned = results[(results["search"] == "kron-gpt2-asha") & (results["status"] == "pruned")]
    finite = pruned[np.isfinite(pruned["params"].astype(float)) & np.isfinite(pruned["quality"].astype(float))]
    assert len(finite) > 0 and len(asha.pruned_x) == len(finite) == len(asha.pruned_hover)
    assert sorted(asha.pruned_x) == sorted(finite["params"].astype(float))
    assert all("pruned at step" in h for h in asha.pruned_hover)
    assert not set(zip(asha.pruned_x, asha.pruned_y)) & set(zip(asha.front_x, asha.front_y))
    assert _is_png(plot_pareto(results, out_png=tmp_path / "p.png"))
