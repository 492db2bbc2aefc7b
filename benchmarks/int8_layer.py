"""int8 execution options on this machine, against a float32 matmul: dequantise-on-the-fly (what
kron.methods.quant.layer.QuantizedLinear does), PyTorch's weight-only int8 kernel (aten._weight_int8pack_mm) and the
fbgemm dynamic-quantised linear (which also quantises activations). Prints a table and a JSON line.

    python benchmarks/int8_layer.py [--out 1024] [--in 256] [--tokens 4096] [--threads 1] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=1024)
    ap.add_argument("--in", dest="inp", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from kron.methods.quant.layer import dequantize_rows, quantize_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.out, a.inp, generator=g)
    x = torch.randn(a.tokens, a.inp, generator=g)
    q, s = quantize_rows(w)
    wd = dequantize_rows(q, s)
    ref = x @ wd.T
    rows = {"float32 matmul": (median_ms(lambda: x @ wd.T, a.repeats), 0.0),
            "dequantise + matmul": (median_ms(lambda: x @ dequantize_rows(q, s).T, a.repeats), 0.0)}
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        y = torch.ops.aten._weight_int8pack_mm(x, q, s)
        rows["aten._weight_int8pack_mm"] = (median_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q, s),
                                                      max(3, a.repeats // 5)), float((y - ref).norm() / ref.norm()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, s.double(), torch.zeros(a.out, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qw, None)
        y = torch.ops.quantized.linear_dynamic(x, packed, True)
        rows["quantized.linear_dynamic (fbgemm)"] = (
            median_ms(lambda: torch.ops.quantized.linear_dynamic(x, packed, True), a.repeats),
            float((y - ref).norm() / ref.norm()))
    except (RuntimeError, AttributeError) as exc:
        print(f"dynamic quantised linear unavailable: {exc}")
    base = rows["float32 matmul"][0]
    print(f"{a.out} x {a.inp} weight, {a.tokens} tokens, {a.threads} thread(s), torch {torch.__version__}")
    print(f"{'kernel':<36} {'ms':>9} {'speed-up':>9} {'rel. output error':>18}")
    for name, (ms, err) in rows.items():
        print(f"{name:<36} {ms:>9.2f} {base / ms:>8.2f}x {err:>18.2e}")
    print(json.dumps({"shape": [a.out, a.inp], "tokens": a.tokens, "threads": a.threads,
                      "ms": {k: v[0] for k, v in rows.items()}, "rel_error": {k: v[1] for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
