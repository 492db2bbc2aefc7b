"""The README's main command, end to end on the bundled demo teacher, shrunk with --smoke (runs in CI)."""
import json

import pytest

from search.cli import main

pytestmark = pytest.mark.ray


def test_quickstart_smoke_on_the_demo_teacher(ray_session, tmp_path, capsys):
    from analysis.results import load_results

    rc = main(["search", "examples/quickstart.yaml", "--smoke", "--storage", str(tmp_path), "--name", "qs"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Pareto" in out or "front" in out
    df = load_results(tmp_path / "qs-smoke")
    searched = df[df["method"] == "mixed"]  # the quickstart searches Kronecker and low-rank per matrix
    assert len(searched) >= 2
    assert set(searched["status"]) <= {"complete", "pruned"}
    done = searched[searched["status"] == "complete"]
    assert len(done) >= 1
    assert (done["compression_ratio"] > 1).all()
    assert done["quality"].notna().all()
    front = list((tmp_path / "qs-smoke" / "analysis").glob("front/*.yaml"))
    assert front, "the front's plans are exported as YAML"
    assert (tmp_path / "qs-smoke" / "analysis" / "pareto.png").stat().st_size > 0
    meta = json.loads((tmp_path / "qs-smoke" / "search_meta.json").read_text())
    assert [o["name"] for o in meta["objectives"]][:2] == ["quality", "params"]
