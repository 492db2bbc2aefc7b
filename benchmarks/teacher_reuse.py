"""What reusing the teacher's outputs across trials of one worker saves (`trial.teacher_cache`, trials.teacher_cache).

For each search config (default: the quickstart and `examples/wikitext2.yaml`, the latter shortened to `--steps`
training steps), in ONE process that plays a reused search worker: the teacher and data are prepared once, a warm-up
trial runs without the cache, one trial fills the cache (a worker's first trial), then trials of the same sampled plan alternate, side by side,
between `teacher_cache: false` (every teacher forward recomputed) and the filled cache (`--repeats` pairs), and
optionally (`--disk`) the float16 disk tier alone (memory bound 0). Reported per config: the mean training-step time
(`train_step_s` of the trial summary: teacher + student passes and the optimiser, evaluations excluded) of each
variant, the median of the per-pair ratios, the first (filling) trial's step time, the cache's memory (the
outputs it holds, and the process's RSS growth while filling), the outputs per batch, and the losses of the two
variants (identical in memory).

    python benchmarks/teacher_reuse.py                       # both configs (~10 min on 2 busy cores)
    python benchmarks/teacher_reuse.py --configs quickstart --repeats 2
    python benchmarks/teacher_reuse.py --smoke               # 6 steps each, one pair: checks the script

Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {"quickstart": REPO / "examples" / "quickstart.yaml", "wikitext2": REPO / "examples" / "wikitext2.yaml"}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trial_config(path: Path, steps: int | None, seed: int = 0) -> dict:
    """The config's trial section with one plan sampled from its space (its seed plans left out: they add options to
    the space and a sensitivity profile to build it), one thread, no checkpoint."""
    from search.config import load_search_config
    from search.prepare import prepared_space

    cfg = load_search_config(path, overrides={"search.seed_plans": []})
    space = prepared_space(cfg)
    params = space.sample_within_budget(seed) if space.budget is not None else space.sample(seed)
    trial = copy.deepcopy(cfg.trial_section)
    trial.update(plan={"rules": space.to_plan_rules(params)}, threads=1, device="cpu", save_checkpoint=False,
                 method="kronecker" if cfg.space.methods == ["kronecker"] else "mixed")
    if steps is not None:
        st = trial["stage1"]
        st.update(max_steps=steps, eval_every=steps, warmup_steps=min(st.get("warmup_steps", 0), steps))
    return trial


def losses(summary: dict) -> list:
    return [(h.get("loss"), h.get("quality")) for h in summary["history"]]


def components(base: dict, n: int = 12) -> dict:
    """Interleaved at the finest grain (robust to a busy machine): per training batch, the teacher's forward pass,
    a cache hit for the same batch, and the student's step (forward, ILKD loss, backward, AdamW) -- medians over
    `n` batches after one warm-up, and the step-time speed-up they imply, (teacher + student) / (hit + student)."""
    import torch

    from trials.config import load_trial_config
    from trials.distill import DistillWeights, forward_for_distillation, ilkd_loss
    from trials.evaluate import batches
    from trials.teacher_cache import TeacherCache, TeacherOutputs, teacher_identity
    from trials.inputs import build_student, load_lm_data, load_teacher, teacher_key

    cfg = load_trial_config(base)
    device = torch.device("cpu")
    teacher, tok = load_teacher(cfg, device)
    train, _ = load_lm_data(cfg, teacher, tok, device)
    student, _, _ = build_student(cfg, teacher)
    if hasattr(student, "set_attn_implementation"):
        student.set_attn_implementation("eager")
    student.train()
    st = cfg.stage1
    w = DistillWeights(**st.distill.model_dump(exclude={"layer_map"}))
    keep = w.logits > 0
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=st.lr)
    cache = TeacherCache()
    cache.configure(memory_mb=1 << 14)
    ctx = teacher_identity(teacher_key(cfg, device), teacher)
    it = batches({"input_ids": train}, st.batch_size, shuffle=True, seed=cfg.seed)
    rows = []
    for i in range(n + 1):
        ids = next(it)["input_ids"]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = TeacherOutputs.from_model_output(forward_for_distillation(teacher, ids), keep)
        t1 = time.perf_counter()
        cache.get_or_compute(ctx, ids, None, lambda: out, keep)
        t2 = time.perf_counter()
        hit = cache.get_or_compute(ctx, ids, None, lambda: None, keep)
        t3 = time.perf_counter()
        assert hit is out
        s_out = forward_for_distillation(student, ids, None, ids)
        loss = ilkd_loss(s_out, hit, w, ce_loss=s_out.loss).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t4 = time.perf_counter()
        if i:
            rows.append((t1 - t0, t3 - t2, t4 - t3))
    med = [statistics.median(r[k] for r in rows) for k in range(3)]
    return {"teacher_fwd_s": round(med[0], 4), "cache_hit_s": round(med[1], 5), "student_step_s": round(med[2], 4),
            "teacher_share": round(med[0] / (med[0] + med[2]), 3),
            "implied_speedup": round(statistics.median((a + c) / (b + c) for a, b, c in rows), 3)}


def measure(name: str, path: Path, steps: int | None, repeats: int, disk: bool, tmp: Path,
            components_only: bool = False) -> dict:
    from trials.teacher_cache import teacher_cache
    from trials.inputs import clear_caches, prepare_data
    from trials.trial import run_trial

    base = trial_config(path, steps)
    clear_caches()
    prepare_data(base, "cpu")  # teacher and data, as the search's driver / a worker's first trial does
    parts = components(base)
    if components_only:
        return {"config": name, "batch": f"{base['stage1']['batch_size']}x{base['data']['seq_len']}",
                "logits_kept": (base["stage1"].get("distill") or {}).get("logits", 0) > 0, **parts}
    cache = teacher_cache()

    def run(variant: str, label: str) -> dict:
        cfg = copy.deepcopy(base)
        cfg["name"] = label
        cfg["teacher_cache"] = {"off": False, "memory": True,
                                "disk": {"memory_mb": 0, "disk_mb": 1 << 16, "disk_dir": str(tmp)}}[variant]
        t = time.time()
        s = run_trial(cfg, progress=False)
        s["_wall"] = time.time() - t
        return s

    warm = run("off", "warm-up")  # the process's allocations for a trial, so that RSS growth below is the cache's
    rss0 = rss_mb()
    fill = run("memory", "fill")
    rss_filled = rss_mb()
    held = cache.stats()
    n_batches = held["memory_entries"]
    off, on, dsk, ratios, dratios = [], [], [], [], []
    same = True
    for i in range(repeats):
        a = run("off", f"off{i}")
        b = run("memory", f"on{i}")
        off.append(a["train_step_s"])
        on.append(b["train_step_s"])
        ratios.append(a["train_step_s"] / b["train_step_s"])
        same &= losses(a) == losses(b) == losses(fill) == losses(warm)
        assert b["teacher_batches"]["computed"] == 0, b["teacher_batches"]
    if disk:
        cache.clear()
        run("disk", "disk-fill")
        for i in range(repeats):
            a = run("off", f"doff{i}")
            c = run("disk", f"disk{i}")
            dsk.append(c["train_step_s"])
            dratios.append(a["train_step_s"] / c["train_step_s"])
        disk_mb = cache.stats()["disk_mb"]
    else:
        disk_mb = None
    steps_run = fill["steps"]
    res = {
        "config": name, "steps": steps_run, "repeats": repeats,
        "batch": f"{base['stage1']['batch_size']}x{base['data']['seq_len']}",
        "logits_kept": (base["stage1"].get("distill") or {}).get("logits", 0) > 0,
        "step_s_off": round(statistics.mean(off), 4), "step_s_reused": round(statistics.mean(on), 4),
        "step_s_first_trial": fill["train_step_s"],
        "speedup_median": round(statistics.median(ratios), 3), "speedups": [round(r, 3) for r in ratios],
        "step_s_disk": round(statistics.mean(dsk), 4) if dsk else None,
        "speedup_disk_median": round(statistics.median(dratios), 3) if dratios else None,
        "cache_mb": held["memory_mb"], "cache_batches": n_batches,
        "mb_per_batch": round(held["memory_mb"] / max(n_batches, 1), 2),
        "rss_growth_mb_while_filling": round(rss_filled - rss0, 1),
        "disk_mb_float16": disk_mb,
        "identical_losses": same,
        **parts,
    }
    clear_caches()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=30, help="training steps of the wikitext2 trials (it has 300)")
    p.add_argument("--repeats", type=int, default=3, help="off / reused pairs per config")
    p.add_argument("--disk", action="store_true", help="also time the float16 disk tier alone")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--components-only", action="store_true",
                   help="only the interleaved per-batch timing (teacher pass, cache hit, student step)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="ktr", dir="/tmp"))
    results = []
    for name in args.configs:
        if name == "wikitext2" and not (REPO.parent / "shared" / "data" / "wikitext-2").is_dir():
            print("wikitext2: ../shared/data/wikitext-2 missing, skipped")
            continue
        cwd = os.getcwd()
        os.chdir(REPO)  # wikitext2.yaml's data path is relative to the repository root
        try:
            steps = 6 if args.smoke else (args.steps if name == "wikitext2" else None)
            results.append(measure(name, CONFIGS[name], steps, 1 if args.smoke else args.repeats, args.disk, tmp,
                                   args.components_only))
        finally:
            os.chdir(cwd)
    load = os.getloadavg()
    print(f"teacher reuse, one process, 1 thread; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"(1 / 5 / 15 min) on {os.cpu_count()} cores")
    print("per batch, interleaved (medians): teacher pass vs cache hit, student step, implied step speed-up")
    for r in results:
        print(f"  {r['config']:<11} {r['batch']}{' +logits' if r['logits_kept'] else ''}: teacher "
              f"{1000 * r['teacher_fwd_s']:.0f} ms ({100 * r['teacher_share']:.0f}% of a step) vs hit "
              f"{1000 * r['cache_hit_s']:.2f} ms; student {1000 * r['student_step_s']:.0f} ms; "
              f"speed-up {r['implied_speedup']:.2f}x")
    if args.components_only:
        print(json.dumps({"benchmark": "teacher_reuse", "components_only": True,
                          "loadavg": [round(x, 2) for x in load], "results": results}))
        return 0
    header = ["config", "steps", "batch", "step s (recompute)", "step s (reused)", "speed-up (median)",
              "first trial step s", "cache MB (batches)", "MB/batch", "RSS +MB", "disk f16 step s", "same losses"]
    rows = [[r["config"], str(r["steps"]), r["batch"] + (" +logits" if r["logits_kept"] else ""),
             f"{r['step_s_off']:.3f}", f"{r['step_s_reused']:.3f}", f"{r['speedup_median']:.2f}x",
             f"{r['step_s_first_trial']:.3f}", f"{r['cache_mb']:.0f} ({r['cache_batches']})", f"{r['mb_per_batch']:.1f}",
             f"{r['rss_growth_mb_while_filling']:.0f}",
             f"{r['step_s_disk']:.3f} ({r['speedup_disk_median']:.2f}x)" if r["step_s_disk"] else "-",
             str(r["identical_losses"])] for r in results]
    from analysis.textfmt import text_table

    print(text_table(header, rows, right=(), rule=False))
    print(json.dumps({"benchmark": "teacher_reuse", "smoke": args.smoke, "loadavg": [round(x, 2) for x in load],
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
