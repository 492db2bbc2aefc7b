"""`kronsearch shapes | plan | compress | merge` through search.cli.main (and once through the console script)."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from kron.io import load_compressed
from kron.plan import CompressionPlan
from search.cli import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_shapes_table(capsys):
    rc, out, err = run(capsys, "shapes", 768, 768, "--min-compression", 3.9, "--max-compression", 4.1)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "768 x 768 weight (out x in): 589,824 parameters, 589,824 multiply-adds per token dense"
    assert lines[1].split() == ["m1", "n1", "m2", "n2", "rank", "params", "compression", "macs/token",
                                "mac-reduction", "order"]
    rows = [line.split() for line in lines[2:-1]]
    assert len(rows) == 6 and all(r[5] == "147,460" and r[6] == "4.00x" for r in rows)
    assert ["192", "768", "4", "1", "1", "147,460", "4.00x", "148,224", "3.98x", "a_first"] in rows
    assert ["384", "384", "2", "2", "1", "147,460", "4.00x", "296,448", "1.99x", "a_first"] in rows
    assert lines[-1] == "6 shapes (rank 1; trivial 1x1 factors omitted)"


def test_shapes_json_limit_rank_aspect(capsys):
    rc, out, _ = run(capsys, "shapes", 3072, 768, "--rank", 2, "--max-aspect", 4, "--limit", 3, "--json")
    rows = json.loads(out)
    assert rc == 0 and len(rows) == 3
    for r in rows:
        assert r["rank"] == 2 and r["m1"] * r["m2"] == 3072 and r["n1"] * r["n2"] == 768
        assert max(r["m1"], r["n1"]) / min(r["m1"], r["n1"]) <= 4
        assert r["params"] == 2 * (r["m1"] * r["n1"] + r["m2"] * r["n2"])
    assert [r["params"] for r in rows] == sorted((r["params"] for r in rows), reverse=True)
    _, out, _ = run(capsys, "shapes", 3072, 768, "--limit", 2)
    assert out.splitlines()[-1] == "2 of 394 shapes (rank 1; trivial 1x1 factors omitted)"


@pytest.mark.parametrize("argv, message", [
    (["shapes", 0, 5], "kronsearch shapes: error: M and N must be positive integers (the weight's out and in sizes), "
                       "got 0 x 5"),
    (["shapes", 8, 8, "--limit", 0], "kronsearch shapes: error: --limit must be a positive integer, got 0"),
    (["shapes", 8, 8, "--rank", 0], "kronsearch shapes: error: --rank must be a positive integer, got 0"),
])
def test_shapes_user_errors_exit_2_with_one_line(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_plan_kngpt2_on_gpt2_architecture(capsys, tmp_path):
    rc, out, err = run(capsys, "plan", "--model", "config:gpt2", "--preset", "kngpt2", "--json",
                       "--out", tmp_path / "kn.yaml")
    assert rc == 0, err
    d = json.loads(out)
    assert d["report"]["params_before"] == 124_439_808
    assert d["report"]["params_after_excluding_output_embedding"] == 85_676_990
    assert d["report"]["macs_per_token_after"] == 104_118_528
    assert d["modules"]["transformer.h.1.attn.c_attn"] == {"shape": [384, 768, 2, 1], "rank": 1, "blocks": 3}
    assert "transformer.h.0.attn.c_attn" not in d["modules"]
    assert CompressionPlan.load(tmp_path / "kn.yaml").to_dict() == d["plan"]
    rc, out, _ = run(capsys, "plan", "--model", "config:gpt2", "--plan", tmp_path / "kn.yaml")
    assert rc == 0
    assert "parameters excluding the output embedding: 124,439,808 -> 85,676,990 (1.45x)" in out
    assert "transformer.wte" in out and "A 50257x384 ⊗ B 1x2" in out


def test_plan_text_on_a_model_directory(capsys, tiny_model_dir):
    rc, out, _ = run(capsys, "plan", "--model", tiny_model_dir("llama"), "--preset", "uniform:2")
    assert rc == 0
    assert out.splitlines()[0].startswith("plan uniform:2 on ")
    assert "LlamaForCausalLM): 14 modules factored" in out.splitlines()[0]
    assert "model.layers.0.self_attn.k_proj" in out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "config:gpt2", "--preset", "kroneckerbert8"], "preset 'kroneckerbert8' is for BERT"),
    (["plan", "--model", "config:gpt2", "--plan", "missing.yaml"], "plan file missing.yaml does not exist"),
    (["plan", "--model", "config:gpt2", "--plan", "bogus"], "'bogus' is neither a plan file nor a preset"),
    (["plan", "--model", "./no/such/dir", "--preset", "kngpt2"], "model source ./no/such/dir does not exist"),
    (["plan", "--model", "config:gpt2", "--preset", "uniform:x"], "give a compression factor >= 1"),
    (["compress", "--model", "./no/such/dir", "--plan", "kngpt2", "--out", "x"], "does not exist"),
    (["merge", "./no/such/ckpt", "--out", "x"], "compressed-model directory no/such/ckpt does not exist"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *argv)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_plan_file_selector_error_names_patterns(capsys, tmp_path):
    (tmp_path / "p.yaml").write_text("rules:\n  - select: mlp.c_fcc\n    factor: 2\n")
    rc, _, err = run(capsys, "plan", "--model", "config:gpt2", "--plan", tmp_path / "p.yaml")
    assert rc == 2 and "selector 'mlp.c_fcc' matches no module" in err and "transformer.h.0.mlp.c_fc" in err


def test_compress_then_merge(capsys, tiny_model_dir, tmp_path, tiny_inputs):
    src = tiny_model_dir("gpt2")
    out = tmp_path / "student"
    rc, stdout, err = run(capsys, "compress", "--model", src, "--plan", "kngpt2", "--out", out, "--device", "cpu",
                          "--json")
    assert rc == 0, err
    d = json.loads(stdout)
    for key in ("params_before", "params_after", "params_after_excluding_output_embedding", "compression_ratio",
                "macs_per_token_before", "macs_per_token_after", "init_errors", "modules"):
        assert key in d
    assert d["out"] == str(out)
    assert set(d["init_errors"]) == {"transformer.wte"} | {f"transformer.h.{i}.{m}" for i in (1, 3)
                                                            for m in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")}
    assert all(0 < e < 1 for e in d["init_errors"].values())
    student = load_compressed(out, device="cpu")
    assert student.kron_info["report"]["params_after"] == d["params_after"]

    rc, stdout, err = run(capsys, "merge", out, "--out", tmp_path / "dense")
    assert rc == 0, err
    assert stdout.startswith(f"merged {out} into a dense GPT2LMHeadModel (")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), attn_implementation="eager")
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, student(**inputs).logits, rtol=0, atol=1e-5)
    rc, _, err = run(capsys, "merge", out, "--out", tmp_path / "dense")
    assert rc == 2 and "exists and is not empty; choose another --out or pass --overwrite" in err
    rc, _, _ = run(capsys, "merge", out, "--out", tmp_path / "dense", "--overwrite")
    assert rc == 0


def test_compress_text_output(capsys, tiny_model_dir, tmp_path):
    rc, out, err = run(capsys, "compress", "--model", tiny_model_dir("bert"), "--plan", "uniform:2", "--out",
                       tmp_path / "b", "--device", "cpu")
    assert rc == 0, err
    assert "bert.encoder.layer.0.attention.self.query" in out
    assert out.splitlines()[-1] == f"saved to {tmp_path / 'b'}"


def test_demo_source(capsys):
    try:
        from trials.teacher import demo_teacher_dir

        demo_teacher_dir()
    except Exception as exc:  # the bundled teacher is built separately
        pytest.skip(f"demo teacher not available: {exc}")
    rc, out, err = run(capsys, "plan", "--model", "demo", "--preset", "kngpt2", "--json")
    assert rc == 0, err
    report = json.loads(out)["report"]
    # The tied LM head becomes a dense copy (as in KnGPT2), so only the count without it shrinks on this small
    # model whose embedding is 40% of its weights.
    assert report["params_after_excluding_output_embedding"] < report["params_before_excluding_output_embedding"]
    assert report["untied_output_embedding"] is True


@pytest.mark.skipif(shutil.which("kronsearch") is None, reason="the kronsearch console script is not installed")
def test_console_script(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(["kronsearch", "shapes", "8", "8", "--limit", "2", "--json"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)) == 2
    bad = subprocess.run(["kronsearch", "plan", "--model", "config:gpt2", "--plan", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"kronsearch plan: error: plan file {tmp_path / 'nope.yaml'} does not exist"


def test_demo_alias_in_the_python_api():
    """'demo' names the bundled teacher wherever a model source is taken: the Python API as well as the CLI."""
    import kron
    from kron.models import demo_teacher_dir, load_config, resolve_source

    assert resolve_source("demo") == str(demo_teacher_dir())
    assert resolve_source("config:gpt2") == "config:gpt2"
    assert load_config("demo").n_layer == 4
    model = kron.load_model("demo", device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_embd == 256
