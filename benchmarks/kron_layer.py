"""Dense vs Kronecker layer speed, and SVD-initialisation time of GPT-2 small under the kngpt2 preset.

    python benchmarks/kron_layer.py [--tokens 4096] [--threads 1 2] [--device auto] [--skip-svd]

glibc returns every large freed block to the OS, so each fresh activation-sized tensor page-faults again;
that costs more than the small matmuls of a Kronecker layer. The script therefore re-executes itself with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised (the same setting helps training; see the README), for
dense and Kronecker alike; --no-malloc-tuning measures with the default allocator behaviour.

Prints a table (speed-up next to the multiply-add ratio, forward and forward+backward, per thread count) and
one JSON line. Targets on a 2-core CPU: ≥ 1.7x faster than dense at the KnGPT2 shapes (the MAC bound is ~2x),
and ≥ 10x where the multiply-add ratio is ≥ 20x; SVD init of GPT-2 small under kngpt2 < 10 s.
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
SWEEP_TARGETS = [2, 5, 10, 20, 50, 100]


def sweep_shapes() -> list[tuple[str, int, int, tuple]]:
    """For each target MAC reduction, the shape of a 3072x768 FFN matrix whose reduction is closest to it."""
    shapes = factor_shapes(3072, 768)
    out = []
    for target in SWEEP_TARGETS:
        best = min(shapes, key=lambda s: abs(s.mac_reduction / target - 1))
        out.append((f"sweep ~{target}x 3072x768", 3072, 768, best.shape))
    return out


def _time(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_layer(out_f: int, in_f: int, shape, tokens: int, device, dtype, repeats: int) -> dict:
    dense = nn.Linear(in_f, out_f, device=device, dtype=dtype)
    kron = KroneckerLinear(in_f, out_f, shape, device=device, dtype=dtype)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)

    def fwd(layer):
        with torch.no_grad():
            layer(x)

    def fwd_bwd(layer):
        layer.zero_grad(set_to_none=True)
        layer(xg).sum().backward()

    res = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        td = _time(lambda: fn(dense), device, repeats)
        tk = _time(lambda: fn(kron), device, repeats)
        res[name] = {"dense_ms": td * 1e3, "kron_ms": tk * 1e3, "speedup": td / tk}
    macs, order = kron_macs(*shape)
    res["mac_ratio"] = out_f * in_f / macs
    res["order"] = order
    return res


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
    if "--no-malloc-tuning" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-svd", action="store_true")
    p.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default large-block behaviour")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype)
    cases = KNGPT2 + sweep_shapes()
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for label, out_f, in_f, shape in cases:
            r = bench_layer(out_f, in_f, shape, args.tokens, device, dtype, args.repeats)
            rows.append({"case": label, "threads": nt, "shape": list(shape), **r})
    print(f"device={device} ({_device_name(device)}), dtype={args.dtype}, tokens={args.tokens}, "
          f"malloc tuning={'off' if args.no_malloc_tuning else 'on'}")
    head = f"{'case':26s} {'thr':>3s} {'A':>10s} {'B':>8s} {'MAC ratio':>9s} | {'fwd dense':>9s} {'fwd kron':>8s} {'speedup':>7s} | {'f+b dense':>9s} {'f+b kron':>8s} {'speedup':>7s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        m1, n1, m2, n2 = r["shape"]
        print(f"{r['case']:26s} {r['threads']:>3d} {f'{m1}x{n1}':>10s} {f'{m2}x{n2}':>8s} {r['mac_ratio']:>8.1f}x | "
              f"{r['fwd']['dense_ms']:>7.2f}ms {r['fwd']['kron_ms']:>6.2f}ms {r['fwd']['speedup']:>6.2f}x | "
              f"{r['fwd_bwd']['dense_ms']:>7.2f}ms {r['fwd_bwd']['kron_ms']:>6.2f}ms {r['fwd_bwd']['speedup']:>6.2f}x")
    svd = None
    if not args.skip_svd:
        torch.set_num_threads(max(threads))
        svd = bench_svd_init(device)
        print(f"SVD init of GPT-2 small under kngpt2: {svd['seconds']:.2f} s "
              f"({svd['params_after_excluding_output_embedding']:,} params excl. output embedding)")
    kn = [r for r in rows if r["case"].startswith("kngpt2")]
    big = [r for r in rows if r["mac_ratio"] >= 20]
    summary = {
        "benchmark": "kron_layer", "device": str(device), "device_name": _device_name(device), "dtype": args.dtype,
        "tokens": args.tokens, "malloc_tuning": not args.no_malloc_tuning, "rows": rows,
        "kngpt2_min_fwd_speedup": min(r["fwd"]["speedup"] for r in kn),
        "kngpt2_min_fwd_bwd_speedup": min(r["fwd_bwd"]["speedup"] for r in kn),
        "mac20_min_fwd_speedup": min((r["fwd"]["speedup"] for r in big), default=None),
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
