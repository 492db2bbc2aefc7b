"""Results under an S3 URI: a local S3 server (moto) stands in for the bucket. The search writes through pyarrow's S3
filesystem (endpoint given in the URI's query, as for MinIO/Ceph), and the driver downloads the results for the
analysis."""
from __future__ import annotations

import json
import os

import pytest

from search.config import load_search_config
from search.storage import experiment_path
from search.tuner import run_search

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) provides the local S3 server")

pytestmark = pytest.mark.ray

BUCKET = "kron-bucket"


@pytest.fixture(scope="module")
def s3_endpoint():
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
    yield f"{host}:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_experiment_path_keeps_the_uri_query():
    cfg = load_search_config({"name": "exp", "trial": {"teacher": "demo", "stage1": {"max_steps": 20}},
                              "space": {"groups": ["ffn_in"]},
                              "search": {"storage": "s3://b/runs/?endpoint_override=h:9000&scheme=http"}})
    assert experiment_path(cfg) == "s3://b/runs/exp?endpoint_override=h:9000&scheme=http"


def test_search_with_s3_storage(ray_session, tiny_search, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the local copy of a remote experiment goes to ./kronsearch_results/<name>
    uri = f"s3://{BUCKET}/runs?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    raw = tiny_search(name="s3", num_samples=2, max_concurrent=2)
    raw["search"]["storage"] = uri
    cfg = load_search_config(raw)
    outcome = run_search(cfg)

    # in the bucket: Ray's experiment state and every trial's own summary (uploaded from the trial's folder)
    keys = _keys(s3_endpoint, "runs/s3/")
    assert any(k.startswith("runs/s3/experiment_state-") for k in keys), keys
    summaries = [k for k in keys if k.endswith("/trial_summary.json")]
    assert len(summaries) == 2, keys
    assert "runs/s3/search_meta.json" in keys

    # locally: the downloaded experiment the analysis reads, with the statuses patched by the driver
    local = tmp_path / "kronsearch_results" / "s3"
    assert outcome.local_dir.resolve() == local.resolve()
    assert len(outcome.trials) == 2 and not outcome.interrupted
    for t in outcome.trials:
        summary = json.loads((local / os.path.basename(t["dir"]) / "trial_summary.json").read_text())
        assert summary["status"] in ("complete", "pruned") and summary["search"] == "s3"
        assert summary["quality"] is not None and summary["params"] > 0
    meta = json.loads((local / "search_meta.json").read_text())
    assert meta["config"]["search"]["storage"] == uri

    from analysis.results import load_results

    df = load_results([local])
    assert len(df) == 2

    # the same name again is refused before Ray starts; --resume of the finished search reruns nothing
    from kron.errors import ConfigError

    with pytest.raises(ConfigError, match="already exists"):
        run_search(cfg)
    changed = load_search_config({**raw, "trial": {**raw["trial"], "seed": 1}})
    with pytest.raises(ConfigError, match="trial section"):
        run_search(changed, resume=True)  # the config in the bucket's search_meta.json differs
    again = run_search(cfg, resume=True)
    assert sorted(t["trial_id"] for t in again.trials) == sorted(t["trial_id"] for t in outcome.trials)
    assert len([k for k in _keys(s3_endpoint, "runs/s3/") if k.endswith("/trial_summary.json")]) == 2


def test_unreachable_storage_is_a_config_error(tiny_search, tmp_path, monkeypatch):
    """A bucket that cannot be listed (no server at the endpoint) is named before any Ray work."""
    from kron.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    raw = tiny_search(name="nos3")
    raw["search"]["storage"] = "s3://nowhere/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    with pytest.raises(ConfigError, match="cannot be read"):
        run_search(load_search_config(raw))
