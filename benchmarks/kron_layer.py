"""Dense vs Kronecker layer speed, and SVD-initialisation time of GPT-2 small under the kngpt2 preset.

    python benchmarks/kron_layer.py [--tokens 4096] [--threads 1 2] [--repeats 7] [--device auto] [--skip-svd]
                                    [--malloc-tuning]
    python benchmarks/kron_layer.py --chunks [--threads 1 2] [--repeats 15] [--chunk-every-layer]
                                    # the chunked forward without gradients against the whole batch, A/B
    python benchmarks/kron_layer.py --pairs [--threads 1 2] [--repeats 15]
                                    # output pairs of B 2 x 1 as complex products against the broadcast, A/B

Runs with the DEFAULT glibc allocator: `kron.functional.kron_linear` reuses its own large buffers, so no
environment variables are needed. --malloc-tuning re-executes the script with MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ raised (glibc then keeps freed blocks instead of unmapping them; this speeds up dense and
Kronecker alike and was the README's setting before the pool).

Three layers are timed side by side in one process, interleaved per repeat (dense, ours, reference; every other
repeat dense, reference, ours: see _time_interleaved), so that the
load of a shared machine hits all three alike; a speed-up is the median over repeats of the per-repeat ratio:
  - nn.Linear,
  - ours: kron.layers.KroneckerLinear (custom autograd Function, contraction order from kron_macs),
  - reference: a faithful re-implementation of the KroneckerBERT authors' einsum CPU path
    (mrtahaei/kronecker-kd, kronecker/layers/kronecker_linear.py, KroneckerLinear.parallel_sum_kron).
Prints a table per thread count and one JSON line with the targets of issue #15 and `meets_target` per row:
forward ≥ 1.8x / forward+backward ≥ 1.7x over nn.Linear at the KnGPT2 shapes, ≥ 10x / ≥ 8x where the
multiply-add ratio is ≥ 20x; SVD init of GPT-2 small under kngpt2 < 10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from kron.factor import factor_shapes, kron_macs
from kron.layers import KroneckerLinear

# (label, out, in, shape) — the KnGPT2 matrices of GPT-2 small, (out x in) like nn.Linear.
KNGPT2 = [
    ("kngpt2 q/k/v 768x768", 768, 768, (384, 768, 2, 1)),
    ("kngpt2 c_fc 3072x768", 3072, 768, (1536, 768, 2, 1)),
    ("kngpt2 c_proj 768x3072", 768, 3072, (768, 1536, 1, 2)),
]
# shapes the issue quotes the KroneckerBERT layer at, besides the KnGPT2 ones
EXTRA = [("kbert 768x3072", 768, 3072, (48, 64, 16, 48))]
SWEEP_TARGETS = [2, 5, 10, 20, 50, 100]
TARGETS = {"kngpt2": {"fwd": 1.8, "fwd_bwd": 1.7}, "mac_ratio_ge_20": {"fwd": 10.0, "fwd_bwd": 8.0}}


def sweep_shapes() -> list[tuple[str, int, int, tuple]]:
    """For each target MAC reduction, the shape of a 3072x768 FFN matrix whose reduction is closest to it."""
    shapes = factor_shapes(3072, 768)
    out = []
    for target in SWEEP_TARGETS:
        best = min(shapes, key=lambda s: abs(s.mac_reduction / target - 1))
        out.append((f"sweep ~{target}x 3072x768", 3072, 768, best.shape))
    return out


class EinsumKroneckerLinear(nn.Module):
    """The KroneckerBERT authors' CPU layer, re-implemented faithfully for a side-by-side measurement.

    mrtahaei/kronecker-kd, kronecker/layers/kronecker_linear.py: KroneckerLinear.parallel_sum_kron (efficient_sum
    path) and forward. Same conventions as ours (A (r, m1, n1) ⊗ B (r, m2, n2), row-major flattening), their cost
    test for the order, two einsums, a sum over the rank and `out + bias`; autograd does the backward.
    """

    def __init__(self, in_features: int, out_features: int, shape, device=None, dtype=None):
        super().__init__()
        m1, n1, m2, n2 = shape
        self.in_factor1, self.in_factor2, self.out_factor1, self.out_factor2 = n1, n2, m1, m2
        self.kn_factor_A = nn.Parameter(torch.randn(1, m1, n1, device=device, dtype=dtype) / n1 ** 0.5)
        self.kn_factor_B = nn.Parameter(torch.randn(1, m2, n2, device=device, dtype=dtype) / n2 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        was_2d = input.dim() == 2
        if was_2d:
            input = input.unsqueeze(1)
        B, T, _ = input.shape
        X = input.view(B * T, self.in_factor1, self.in_factor2).transpose(1, 2)
        cost_option1 = self.in_factor1 * self.out_factor2 * (self.in_factor2 + self.out_factor1)
        cost_option2 = self.in_factor2 * self.out_factor1 * (self.in_factor1 + self.out_factor2)
        if cost_option1 <= cost_option2:
            temp = torch.einsum("s o i, b i j -> b s o j", self.kn_factor_B, X)
            out_all = torch.einsum("b s o j, s j k -> b s k o", temp, self.kn_factor_A.transpose(1, 2))
        else:
            temp = torch.einsum("b i j, s k j -> b s i k", X, self.kn_factor_A)
            out_all = torch.einsum("s o i, b s i k -> b s k o", self.kn_factor_B, temp)
        result = out_all.sum(dim=1).reshape(B, T, -1)
        if was_2d:
            result = result.squeeze(1)
        return result + self.bias


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(fns: dict, device, repeats: int, warmup: int = 2, clock=time.perf_counter,
                      alternate: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns within every repeat. alternate: every other
    repeat runs the functions after the first in reverse order (first, a, b / first, b, a), so that a and b each
    follow the first and each other equally often — on small, cache-resident sizes a function that runs right after
    a different layer finds the cache cold, and a fixed order favours the one that follows its twin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        order = names[:1] + names[:0:-1] if alternate and i % 2 else names
        for name in order:
            fn = fns[name]
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            times[name].append(clock() - t0)
    return times


def bench_layer(out_f: int, in_f: int, shape, tokens: int, device, dtype, repeats: int,
                clock=time.perf_counter) -> dict:
    layers = {
        "dense": nn.Linear(in_f, out_f, device=device, dtype=dtype),
        "ours": KroneckerLinear(in_f, out_f, shape, device=device, dtype=dtype),
        "ref": EinsumKroneckerLinear(in_f, out_f, shape, device=device, dtype=dtype),
    }
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)

    def fwd(layer):
        with torch.no_grad():
            layer(x)

    def fwd_bwd(layer):
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        layer(xg).sum().backward()

    res = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        t = _time_interleaved({k: (lambda l=l: fn(l)) for k, l in layers.items()}, device, repeats, clock=clock,
                              alternate=True)
        row = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in t.items()}
        for k in ("ours", "ref"):
            row[f"{k}_speedup"] = statistics.median(d / o for d, o in zip(t["dense"], t[k]))
        res[name] = row
    macs, order = kron_macs(*shape)
    res["mac_ratio"] = out_f * in_f / macs
    res["order"] = order
    return res


def bench_chunks(out_f: int, in_f: int, shape, tokens: int, repeats: int, clock=time.perf_counter) -> dict:
    """Forward without gradients of our layer with the token chunks `kron.functional` picks for it against the
    whole batch at once (chunks off), interleaved per repeat; speed-up = median of per-repeat ratios whole/chunked."""
    from kron import functional as F

    layer = KroneckerLinear(in_f, out_f, shape)
    x = torch.randn(tokens, in_f)
    m1, n1, m2, n2 = shape
    chunk = F._chunk_tokens(x.view(tokens, n1, n2), layer.A, layer.B, layer.order)
    default = F._CHUNK_TOKENS

    def fwd(chunk_tokens):
        def run():
            F._CHUNK_TOKENS = chunk_tokens
            try:
                with torch.no_grad():
                    layer(x)
            finally:
                F._CHUNK_TOKENS = default
        return run

    t = _time_interleaved({"whole": fwd(1 << 62), "chunked": fwd(default)}, torch.device("cpu"), repeats, clock=clock,
                          alternate=True)
    return {"chunk_tokens": chunk, "whole_ms": statistics.median(t["whole"]) * 1e3,
            "chunked_ms": statistics.median(t["chunked"]) * 1e3,
            "speedup": statistics.median(w / c for w, c in zip(t["whole"], t["chunked"]))}


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _ab_rows(args, cases, bench, header: str, line) -> list[dict]:
    """An A/B mode's loop: `bench(out_f, in_f, shape, tokens, repeats, clock)` for every case on every thread count;
    `header` (with {nt}) printed per thread count, `line(label, shape, result)` per case; the rows for the JSON line."""
    rows = []
    for nt in args.threads:
        torch.set_num_threads(nt)
        clock = time.thread_time if args.clock == "cpu" and nt == 1 else time.perf_counter
        print(header.format(nt=nt))
        for label, out_f, in_f, shape in cases:
            r = bench(out_f, in_f, shape, args.tokens, args.repeats, clock)
            rows.append({"case": label, "threads": nt, "shape": list(shape), **r})
            print(line(label, shape, r), flush=True)
    return rows


def main_chunks(args, cases) -> int:
    """--chunks: the A/B of the chunked forward (CPU); --chunk-every-layer lifts the rule that picks the layers
    (intensity and thread count) for the whole run."""
    from kron import functional as F

    if args.chunk_every_layer:
        F._CHUNK_MAX_INTENSITY, F._CHUNK_MIN_THREADS = float("inf"), 1
    print(f"chunked forward (no grad) vs the whole batch, CPU, {args.tokens} tokens, {args.repeats} repeats, "
          f"interleaved; load average {_load()}", flush=True)

    def line(label, shape, r):
        m1, n1, m2, n2 = shape
        chunk = "whole" if r["chunk_tokens"] >= args.tokens else str(r["chunk_tokens"])
        return (f"{label:24s} {f'{m1}x{n1}':>9s} {f'{m2}x{n2}':>7s} {chunk:>6s} | {r['whole_ms']:>6.1f}ms "
                f"{r['chunked_ms']:>6.1f}ms {r['speedup']:>5.2f}x")

    rows = _ab_rows(args, cases, bench_chunks, "\n{nt} thread(s)\n" + f"{'case':24s} {'A':>9s} {'B':>7s} "
                    f"{'chunk':>6s} | {'whole':>8s} {'chunked':>8s} {'x':>6s}", line)
    print(json.dumps({"benchmark": "kron_layer_chunks", "tokens": args.tokens, "repeats": args.repeats,
                      "every_layer": args.chunk_every_layer, "rows": rows}))
    return 0


def bench_pairs(out_f: int, in_f: int, shape, tokens: int, repeats: int, clock=time.perf_counter) -> dict:
    """nn.Linear, our layer, and our layer with the complex-pair path of `kron.functional` off (pairs written by
    the plain broadcast product), interleaved per repeat; forward without gradients and forward+backward."""
    from kron import functional as F

    dense, ours = nn.Linear(in_f, out_f), KroneckerLinear(in_f, out_f, shape)
    x = torch.randn(tokens, in_f)
    xg = x.clone().requires_grad_(True)
    real = F._as_pairs

    def run(layer, grad: bool, pairs: bool = True):
        def go():
            F._as_pairs = real if pairs else (lambda t: None)
            try:
                if grad:
                    layer.zero_grad(set_to_none=True)
                    xg.grad = None
                    layer(xg).sum().backward()
                else:
                    with torch.no_grad():
                        layer(x)
            finally:
                F._as_pairs = real
        return go

    res = {}
    for name, grad in (("fwd", False), ("fwd_bwd", True)):
        t = _time_interleaved({"dense": run(dense, grad), "pairs": run(ours, grad),
                               "no_pairs": run(ours, grad, pairs=False)}, torch.device("cpu"), repeats, clock=clock,
                              alternate=True)
        res[name] = {**{f"{k}_ms": statistics.median(v) * 1e3 for k, v in t.items()},
                     **{f"{k}_speedup": statistics.median(d / o for d, o in zip(t["dense"], t[k]))
                        for k in ("pairs", "no_pairs")},
                     "pairs_vs_no_pairs": statistics.median(n / o for n, o in zip(t["no_pairs"], t["pairs"]))}
    return res


def main_pairs(args, cases) -> int:
    """--pairs: the A/B of the complex-pair path (CPU) at the shapes that take it (B 2 x 1)."""
    cases = [c for c in cases if tuple(c[3][2:]) == (2, 1)]
    print(f"complex-pair path vs the broadcast product, CPU, {args.tokens} tokens, {args.repeats} repeats, "
          f"interleaved with nn.Linear; load average {_load()}", flush=True)

    def line(label, shape, r):
        f, fb = r["fwd"], r["fwd_bwd"]
        return (f"{label:24s} {f['pairs_speedup']:>5.2f}x/{f['no_pairs_speedup']:>5.2f}x "
                f"{fb['pairs_speedup']:>5.2f}x/{fb['no_pairs_speedup']:>5.2f}x | "
                f"{f['pairs_vs_no_pairs']:>5.2f}x {fb['pairs_vs_no_pairs']:>5.2f}x")

    rows = _ab_rows(args, cases, bench_pairs, "\n{nt} thread(s): speed-up over nn.Linear with pairs / without | "
                    "pairs vs without\n" + f"{'case':24s} {'fwd':>13s} {'f+b':>13s} | {'fwd':>6s} {'f+b':>6s}", line)
    print(json.dumps({"benchmark": "kron_layer_pairs", "tokens": args.tokens, "repeats": args.repeats,
                      "rows": rows}))
    return 0


def _target(row: dict) -> dict | None:
    if row["case"].startswith("kngpt2"):
        return TARGETS["kngpt2"]
    if row["mac_ratio"] >= 20:
        return TARGETS["mac_ratio_ge_20"]
    return None


def bench_svd_init(device) -> dict:
    """Wall time of compress(GPT-2 small random weights, kngpt2) — every SVD of the preset."""
    from kron.models import load_model
    from kron.presets import preset_plan
    from kron.surgery import compress

    model = load_model("config:gpt2", device=device)
    plan = preset_plan("kngpt2", model.config)
    t0 = time.perf_counter()
    report = compress(model, plan, inplace=True, init="svd")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "modules": len([m for m in report.modules if m.get("init_error") is not None])
            if isinstance(report.modules[0], dict) else len(report.modules),
            "params_after_excluding_output_embedding": report.params_after_excluding_output_embedding}


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cases", nargs="*", default=None, help="only the cases whose label contains one of these")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time 1-thread rows by the calling thread's CPU time (user + system, page faults "
                        "included), which a loaded shared machine distorts less than wall time; rows with more "
                        "threads stay on wall time")
    p.add_argument("--skip-svd", action="store_true")
    p.add_argument("--chunks", action="store_true",
                   help="instead: time the chunked forward without gradients against the whole batch (CPU), per shape "
                        "(rows whose layer is not chunked show 'whole' and a ratio near 1)")
    p.add_argument("--pairs", action="store_true",
                   help="A/B of the complex-pair path (kron.functional._as_pairs) against the broadcast product, at "
                        "the shapes with B 2 x 1")
    p.add_argument("--chunk-every-layer", action="store_true",
                   help="with --chunks: chunk every shape on any thread count (tests the rule that picks them)")
    p.add_argument("--malloc-tuning", action="store_true",
                   help="re-execute with glibc's MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised (opt-in)")
    args = p.parse_args(argv)
    if args.malloc_tuning and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    tuned = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype)
    cases, seen = [], set()
    for case in KNGPT2 + EXTRA + sweep_shapes():
        key = (case[1], case[2], tuple(case[3]))
        if key not in seen and (not args.cases or any(c in case[0] for c in args.cases)):
            seen.add(key)
            cases.append(case)
    if args.chunks:
        return main_chunks(args, cases)
    if args.pairs:
        return main_pairs(args, cases)
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    load = _load()
    print(f"device={device} ({_device_name(device)}, {os.cpu_count()} CPUs, load average {load}), "
          f"dtype={args.dtype}, tokens={args.tokens}, repeats={args.repeats}, "
          f"allocator={'glibc tuned (MALLOC_* env)' if tuned else 'glibc default'}", flush=True)
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        head = (f"{'case':24s} {'A':>9s} {'B':>7s} {'MACs':>6s} | {'dense':>8s} {'ours':>7s} {'x':>6s} | "
                f"{'dense':>8s} {'ours':>7s} {'x':>6s} | {'ref fwd':>7s} {'ref f+b':>7s} | target")
        clock_name = "thread CPU time" if args.clock == "cpu" and nt == 1 else "wall time"
        print(f"\n{nt} thread(s), {clock_name}: forward (no grad) | forward+backward | einsum reference speed-up; "
              "ms are medians, x = median per-repeat speed-up over nn.Linear")
        print(head)
        print("-" * len(head), flush=True)
        for label, out_f, in_f, shape in cases:
            cpu_clock = args.clock == "cpu" and nt == 1 and device.type == "cpu"
            clock = time.thread_time if cpu_clock else time.perf_counter
            r = bench_layer(out_f, in_f, shape, args.tokens, device, dtype, args.repeats, clock)
            row = {"case": label, "threads": nt, "shape": list(shape),
                   "clock": "thread_cpu" if clock is time.thread_time else "wall", **r}
            target = _target(row)
            row["target"] = target
            row["meets_target"] = None if target is None else bool(
                r["fwd"]["ours_speedup"] >= target["fwd"] and r["fwd_bwd"]["ours_speedup"] >= target["fwd_bwd"])
            rows.append(row)
            m1, n1, m2, n2 = shape
            f, fb = r["fwd"], r["fwd_bwd"]
            verdict = "-" if target is None else (
                f"{'met' if row['meets_target'] else 'MISSED'} ({target['fwd']:g}x/{target['fwd_bwd']:g}x)")
            print(f"{label:24s} {f'{m1}x{n1}':>9s} {f'{m2}x{n2}':>7s} {r['mac_ratio']:>5.1f}x | "
                  f"{f['dense_ms']:>6.1f}ms {f['ours_ms']:>5.1f}ms {f['ours_speedup']:>5.2f}x | "
                  f"{fb['dense_ms']:>6.1f}ms {fb['ours_ms']:>5.1f}ms {fb['ours_speedup']:>5.2f}x | "
                  f"{f['ref_speedup']:>6.2f}x {fb['ref_speedup']:>6.2f}x | {verdict}", flush=True)
    svd = None
    if not args.skip_svd:
        torch.set_num_threads(max(threads))
        svd = bench_svd_init(device)
        print(f"SVD init of GPT-2 small under kngpt2: {svd['seconds']:.2f} s "
              f"({svd['params_after_excluding_output_embedding']:,} params excl. output embedding)")
    kn = [r for r in rows if r["case"].startswith("kngpt2")]
    big = [r for r in rows if r["mac_ratio"] >= 20]
    judged = [r for r in rows if r["meets_target"] is not None]
    summary = {
        "benchmark": "kron_layer", "device": str(device), "device_name": _device_name(device), "dtype": args.dtype,
        "tokens": args.tokens, "repeats": args.repeats, "malloc_tuning": tuned, "load_average_at_start": load,
        "targets": TARGETS, "rows": rows,
        "kngpt2_min_fwd_speedup": min((r["fwd"]["ours_speedup"] for r in kn), default=None),
        "kngpt2_min_fwd_bwd_speedup": min((r["fwd_bwd"]["ours_speedup"] for r in kn), default=None),
        "mac20_min_fwd_speedup": min((r["fwd"]["ours_speedup"] for r in big), default=None),
        "mac20_min_fwd_bwd_speedup": min((r["fwd_bwd"]["ours_speedup"] for r in big), default=None),
        "all_targets_met": all(r["meets_target"] for r in judged) if judged else None,
        "svd_init_seconds": svd["seconds"] if svd else None,
    }
    print(json.dumps(summary))
    return 0


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
