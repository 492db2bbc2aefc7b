"""The multi-node path: `kronsearch search --address` against a two-node Ray cluster started on this machine
(`ray.cluster_utils.Cluster`: two raylets of one CPU each, so two concurrent trials must run on different nodes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_search_with_address_spreads_trials_over_two_nodes(tiny_search, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # The cluster's session files -- and the ray_current_cluster file through which a plain ray.init() joins "the"
    # local cluster -- go to a private folder, not /tmp/ray: no other Ray user on this machine finds this cluster.
    # Short, for Ray's unix socket paths.
    ray_tmp = tempfile.mkdtemp(prefix="krc", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        node_ids = {n.node_id for n in cluster.list_all_nodes()}
        assert len(node_ids) == 2

        raw = tiny_search(name="cluster", num_samples=4, asha=None)
        raw["trial"]["stage1"].update(max_steps=4, eval_every=2)
        cfg_path = tmp_path / "search.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run([sys.executable, "-m", "search.cli", "search", str(cfg_path), "--address",
                                 cluster.address], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "4 trials in" in result.stdout and "(4 complete" in result.stdout, result.stdout[-2000:]

        exp = Path(raw["search"]["storage"]) / "cluster"
        trial_dirs = sorted(exp.glob("trial_*"))
        assert len(trial_dirs) == 4
        seen = set()
        for d in trial_dirs:
            summary = json.loads((d / "trial_summary.json").read_text())
            assert summary["status"] == "complete" and summary["quality"] is not None, (d.name, summary["status"])
            results = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
            assert results and results[-1].get("trial_finished"), d.name
            seen |= {r["node_id"] for r in results}
        assert seen == node_ids, (seen, node_ids)  # every trial reported its node; both nodes ran trials
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
