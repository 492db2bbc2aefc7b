"""Whole-model speed of GPT-2 small and BERT-base, dense vs Kronecker and low-rank plans, with and without a second
process competing for the CPU (issue #15 part 2).

    python benchmarks/model_speed.py [--models gpt2 bert] [--variants dense kngpt2 uniform:2 uniform:4 lowrank:4]
                                     [--batch 4] [--seq-len 128] [--threads 2] [--repeats 5] [--warmup 2]
                                     [--device auto] [--dtype float32] [--attn eager] [--no-contention]
                                     [--no-ceiling] [--quick]

Models, random weights, built offline by `kron.models.load_model`:
  - gpt2: `config:gpt2`, GPT-2 small as a causal LM (GPT2LMHeadModel, the 50257 x 768 LM head included);
  - bert: `config:bert-base-uncased`, BERT-base as the base encoder (BertModel with its pooler; no MLM head).
Variants: dense, and the plans kngpt2 (GPT-2 only: n/a for BERT), uniform:2, uniform:4, lowrank:4 (any preset
`kron.presets.get_plan` knows may be named), built with `kron.surgery.compress(..., init="none")`: the factors are
random, which does not change the speed and skips the SVDs.

Per variant, on batch x seq-len random token ids (attention as --attn, default eager, what load_model uses for
config: sources):
  - inference: one forward under torch.inference_mode (eval mode, use_cache=False), in ms and tokens/s;
  - training step: forward + backward of the student alone, no teacher, no optimizer step (train mode, dropout on
    as in distillation; gradients set to None after each step, inside the timing): GPT-2's LM loss (labels = the
    inputs), BERT's mean of the last hidden state.
Warm-up rounds, then --repeats rounds; within every round the variants take turns (in a rotated order), so the load
of a shared machine hits them alike. Times are medians; a speed-up over dense is the median over rounds of the
per-round ratio dense time / variant time.

Multiply-adds per token: `kron.surgery.macs_per_token` (every linear layer: nn.Linear / Conv1D at in·out, Kronecker
layers at their cheaper contraction order, low-rank at r·(in + out); GPT-2's LM head included; embedding lookups,
biases, norms, softmax not counted), with two corrections made here: BERT's pooler, which runs once per sequence
and macs_per_token counts per token, is divided by seq-len; and the attention-score products QKᵀ and softmax·V,
which macs_per_token leaves out, are added at 2 · seq-len · d_model per layer per token, the full seq-len x seq-len
product for GPT-2 too: eager attention computes all of it and masks afterwards, so no seq-len/2 for causal (with
--attn sdpa a kernel may skip the masked half; the term is ~2% of GPT-2 small's MACs at 128 tokens). The MAC ratio dense / variant is used for the training step as well (backward ≈ 2x forward per matrix).
Target per row: speed-up ≥ 0.9 x MAC ratio, "met" / "MISSED", for inference and for the training step.

Ceiling (default on; --no-ceiling skips it): how fast ANY layer with the variant's linear multiply-adds could make the
model, given that the rest (embeddings, norms, GELU, softmax, attention-score products, copies, the loss) does not
shrink. A copy of dense in which every nn.Linear / Conv1D (the LM head included) is replaced by a stand-in that only
writes its output (a broadcast of one input feature times a learnable scalar, so that the backward still runs
through the whole model) is timed in the same rounds: its time O is the time of everything but the linear layers'
arithmetic. Then ceiling = dense / (O + (dense − O) · linear MACs of the variant / linear MACs of dense): linear
time scaled by the multiply-adds, Amdahl's law with the rest fixed. A row whose 0.9 x MAC-ratio target lies above
its ceiling cannot be met by faster layers; "of_ceiling" in the JSON is how close a variant gets to its ceiling.

Contention (default on; --no-contention skips it): a second process runs a one-thread 512 x 512 torch matmul loop,
keeping one core busy. It is started once before the first measurement and killed in a `finally`; on POSIX it is
paused (SIGSTOP) and resumed (SIGCONT) so that every round times each variant both quiet and busy, in alternating
order (elsewhere it is started and killed around each busy pass). A variant's slowdown is the median over rounds of
its busy time / quiet time; the target (issue #15): the Kronecker models' slowdown no worse than dense's, judged
here as ≤ dense's x (1 + --slowdown-tolerance, default 0.05) per row (lowrank:4 is shown, judged, but not a
Kronecker model, so left out of the overall verdict).

--quick swaps in tiny configs written to a temp dir (2 layers, d_model 128, 4 heads, FFN 512, vocab 1000) with
batch 2 x 32 tokens and one warm-up round unless given: a smoke test that runs in seconds.
Prints the header (device, threads, load average), a table per model and one JSON line
`{"benchmark": "model_speed", ...}`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

MODELS = {
    "gpt2": {"src": "config:gpt2", "task": "causal-lm", "label": "GPT-2 small, causal LM with its LM head"},
    "bert": {"src": "config:bert-base-uncased", "task": "base", "label": "BERT-base, base encoder with its pooler"},
}
DEFAULT_VARIANTS = ("dense", "kngpt2", "uniform:2", "uniform:4", "lowrank:4")
KRONECKER_PRESETS = ("kngpt2", "kroneckerbert", "uniform")  # plan names whose models are Kronecker models
SPEEDUP_OF_MAC_RATIO = 0.9
QUICK = {"batch": 2, "seq_len": 32, "warmup": 1}

# The competing process: one thread of 512 x 512 matmuls. It dies with the benchmark even when the benchmark is
# killed outright: PR_SET_PDEATHSIG (Linux; SIGKILL also ends a stopped process) and a parent check in the loop.
CONTENDER = r"""
import ctypes, os, sys
try:
    ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL
except (OSError, AttributeError):
    pass
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
c = torch.empty(512, 512)
parent = os.getppid()
print("ready", flush=True)
i = 0
while True:
    torch.mm(a, a, out=c)
    i += 1
    if i % 64 == 0 and os.getppid() != parent:
        break
"""


class Contender:
    """A subprocess keeping one core busy; `busy()` / `quiet()` switch it on and off, `stop()` kills it."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.can_pause = hasattr(signal, "SIGSTOP") and hasattr(signal, "SIGCONT")
        self.running = False

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with tempfile.TemporaryFile("w+") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", CONTENDER], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=err, env=env, text=True)
            line = self.proc.stdout.readline()  # "" at EOF if the child dies: no hang
            if line.strip() != "ready":
                self.stop()
                err.seek(0)
                raise RuntimeError(f"the contention process did not start: {err.read()[-2000:]}")
        self.running = True

    def start(self) -> None:
        """Start the process, paused where pausing is possible (else it is started by the first busy())."""
        if self.can_pause:
            self._start()
            self.quiet()

    def busy(self) -> None:
        if self.can_pause:
            os.kill(self.proc.pid, signal.SIGCONT)
        elif self.proc is None:
            self._start()
        self.running = True
        time.sleep(0.1)  # let it get going

    def quiet(self) -> None:
        if self.proc is None:
            return
        if self.can_pause:
            os.kill(self.proc.pid, signal.SIGSTOP)
        else:
            self.stop()
        self.running = False
        time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc, self.running = self.proc, None, False
        if proc is None:
            return
        try:
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.stdout is not None:
            proc.stdout.close()


def _quick_configs(tmp: Path) -> dict[str, dict]:
    from transformers import BertConfig, GPT2Config

    small = {"vocab_size": 1000}
    gpt2 = GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=256, architectures=["GPT2LMHeadModel"], **small)
    bert = BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                      max_position_embeddings=256, **small)
    out = {}
    for key, cfg in (("gpt2", gpt2), ("bert", bert)):
        path = tmp / f"{key}-quick.json"
        cfg.to_json_file(str(path))
        out[key] = {**MODELS[key], "src": f"config:{path}",
                    "label": MODELS[key]["label"] + " (quick: 2 layers, d_model 128, vocab 1000)"}
    return out


NO_LINEAR = "(no linear)"  # the ceiling's model: dense with every linear layer's arithmetic taken out


class _OutputOnly(nn.Module):
    """Stands in for a linear layer: writes an output of the right shape (input feature 0 broadcast, times a
    learnable scalar so gradients flow through) and does no multiply-adds."""

    def __init__(self, out_features: int, like: torch.Tensor):
        super().__init__()
        self.out_features = out_features
        self.scale = nn.Parameter(torch.ones((), device=like.device, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1].expand(*x.shape[:-1], self.out_features) * self.scale


def without_linear(dense: nn.Module) -> nn.Module:
    """A copy of dense whose nn.Linear and Conv1D layers (the LM head included) are `_OutputOnly` stand-ins."""
    import copy

    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(dense)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            out, like = mod.out_features, mod.weight
        elif isinstance(mod, Conv1D):
            out, like = mod.nf, mod.weight
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, _OutputOnly(out, like))
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the LM head is a stand-in now; nothing to tie
    return model


def _is_kronecker(variant: str) -> bool:
    return variant.startswith(KRONECKER_PRESETS)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_macs(model: nn.Module, seq_len: int) -> dict:
    """Multiply-adds per token: linear layers (macs_per_token, BERT's pooler per sequence) + attention scores."""
    from kron.surgery import macs_per_token

    linear = float(macs_per_token(model))
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):  # BertModel: runs on the first token of each sequence only
        p = macs_per_token(pooler)
        linear += p / seq_len - p
    cfg = model.config
    attention = cfg.num_hidden_layers * 2 * seq_len * cfg.hidden_size
    return {"linear": linear, "attention_scores": float(attention), "total": linear + attention}


def build_variants(spec: dict, variants: list[str], device, dtype, attn: str, ceiling: bool = False
                   ) -> tuple[dict, dict, dict]:
    """(name -> model, name -> reason it does not apply, name -> seconds to build); dense is loaded, the others are
    compressed copies of it (init="none"); with ceiling, also dense without its linear layers (NO_LINEAR)."""
    from kron.errors import PlanError
    from kron.models import load_model
    from kron.presets import get_plan
    from kron.surgery import compress

    t0 = time.perf_counter()
    dense = load_model(spec["src"], task=spec["task"], device=device, dtype=dtype, attn_implementation=attn)
    models, na, seconds = {"dense": dense}, {}, {"dense": time.perf_counter() - t0}
    for name in variants:
        if name == "dense":
            continue
        try:
            plan = get_plan(name, dense.config)
            t0 = time.perf_counter()
            report = compress(dense, plan, inplace=False, init="none")
        except PlanError as exc:
            na[name] = str(exc)
            continue
        seconds[name] = time.perf_counter() - t0
        models[name] = report.model.eval()
    if ceiling:
        t0 = time.perf_counter()
        models[NO_LINEAR] = without_linear(dense).eval()
        seconds[NO_LINEAR] = time.perf_counter() - t0
    return models, na, seconds


def _step_fns(model: nn.Module, task: str, ids: torch.Tensor):
    def infer():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def train():
        if task == "causal-lm":
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            loss = model(input_ids=ids, use_cache=False).last_hidden_state.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return infer, train


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_model(key: str, spec: dict, args, device, dtype, contender: Contender | None) -> dict:
    models, na, build_s = build_variants(spec, args.variants, device, dtype, args.attn, args.ceiling)
    variants = [n for n in args.variants if n in models]  # the rows; the ceiling's model is only timed
    names = variants + ([NO_LINEAR] if args.ceiling else [])
    cfg = models["dense"].config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is not None and args.seq_len > limit:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds {key}'s {limit} positions")
    from kron.surgery import count_params

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=gen).to(device)
    fns = {n: _step_fns(models[n], spec["task"], ids) for n in names}
    macs = {n: model_macs(models[n], args.seq_len) for n in variants}
    params = {n: count_params(models[n]) for n in variants}

    def run(name: str, kind: str) -> float:
        model = models[name]
        model.train(kind == "train")
        return _timed(fns[name][0 if kind == "infer" else 1], device)

    for _ in range(args.warmup):
        for n in names:
            run(n, "infer")
            run(n, "train")
    conds = ["quiet", "busy"] if contender is not None else ["quiet"]
    times = {c: {n: {"infer": [], "train": []} for n in names} for c in conds}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for cond in (conds if r % 2 == 0 else conds[::-1]):
            if contender is not None:
                contender.busy() if cond == "busy" else contender.quiet()
            for n in order:
                times[cond][n]["infer"].append(run(n, "infer"))
                times[cond][n]["train"].append(run(n, "train"))
        if contender is not None:
            contender.quiet()

    tokens = args.batch * args.seq_len
    rows = []
    for n in variants:
        row = {"variant": n, "kronecker": _is_kronecker(n), "params": params[n], "macs_per_token": macs[n],
               "mac_ratio": macs["dense"]["total"] / macs[n]["total"], "build_seconds": build_s[n]}
        for kind in ("infer", "train"):
            q = times["quiet"][n][kind]
            med = statistics.median(q)
            r = {"ms": med * 1e3, "tokens_per_s": tokens / med,
                 "speedup": statistics.median(d / v for d, v in zip(times["quiet"]["dense"][kind], q))}
            r["target_speedup"] = None if n == "dense" else SPEEDUP_OF_MAC_RATIO * row["mac_ratio"]
            r["met"] = None if n == "dense" else bool(r["speedup"] >= r["target_speedup"])
            if args.ceiling:
                # per round: dense / (O + (dense - O) * linear MAC share), O = the no-linear model's time
                share = macs[n]["linear"] / macs["dense"]["linear"]
                r["ceiling_speedup"] = statistics.median(
                    d / (o + (d - o) * share) for d, o in zip(times["quiet"]["dense"][kind],
                                                             times["quiet"][NO_LINEAR][kind]))
                r["of_ceiling"] = r["speedup"] / r["ceiling_speedup"]
            if contender is not None:
                b = times["busy"][n][kind]
                r["busy_ms"] = statistics.median(b) * 1e3
                r["busy_speedup"] = statistics.median(d / v for d, v in zip(times["busy"]["dense"][kind], b))
                r["slowdown"] = statistics.median(x / y for x, y in zip(b, q))
            row[kind] = r
        rows.append(row)
    if contender is not None:
        for row in rows:
            for kind in ("infer", "train"):
                dense = rows[0][kind]["slowdown"]
                row[kind]["slowdown_vs_dense"] = row[kind]["slowdown"] / dense
                row[kind]["slowdown_ok"] = None if row["variant"] == "dense" else bool(
                    row[kind]["slowdown"] <= dense * (1 + args.slowdown_tolerance))
    out = {"model": key, "source": spec["src"], "task": spec["task"], "label": spec["label"], "rows": rows,
           "not_applicable": na}
    if args.ceiling:
        out["no_linear_ms"] = {k: statistics.median(times["quiet"][NO_LINEAR][k]) * 1e3 for k in ("infer", "train")}
        out["no_linear_share"] = {k: statistics.median(o / d for o, d in zip(times["quiet"][NO_LINEAR][k],
                                                                            times["quiet"]["dense"][k]))
                                  for k in ("infer", "train")}
    return out


def _verdict(r: dict) -> str:
    return "-" if r["met"] is None else f"{'met' if r['met'] else 'MISSED'} ({r['target_speedup']:.2f}x)"


def print_model(res: dict, contention: bool) -> None:
    print(f"\n{res['model']}: {res['label']} ({res['source']})")
    ceil = "no_linear_ms" in res

    def _ceil(r: dict) -> str:
        return f" {r['ceiling_speedup']:>5.2f}x" if ceil and "ceiling_speedup" in r else (" " * 7 if ceil else "")

    c_head = f" {'ceil':>6}" if ceil else ""
    head = (f"{'variant':<10} {'params':>7} {'MACs/tok':>9} {'MAC x':>6} | {'infer':>8} {'tok/s':>7} {'x':>5} "
            f"{'target':<14}{c_head} | {'train':>8} {'tok/s':>7} {'x':>5} {'target':<14}{c_head}")
    print(head)
    print("-" * len(head))
    for row in res["rows"]:
        i, t = row["infer"], row["train"]
        print(f"{row['variant']:<10} {row['params'] / 1e6:>6.1f}M {row['macs_per_token']['total'] / 1e6:>8.1f}M "
              f"{row['mac_ratio']:>5.2f}x | {i['ms']:>6.1f}ms {i['tokens_per_s']:>7.0f} {i['speedup']:>4.2f}x "
              f"{_verdict(i):<14}{_ceil(i)} | {t['ms']:>6.1f}ms {t['tokens_per_s']:>7.0f} {t['speedup']:>4.2f}x "
              f"{_verdict(t):<14}{_ceil(t)}")
    if ceil:
        print(f"ceil: the speed-up if the linear layers' time shrank with their multiply-adds and nothing else did; "
              f"dense without its linear arithmetic took {res['no_linear_ms']['infer']:.1f} ms "
              f"({res['no_linear_share']['infer']:.0%} of dense) inference, {res['no_linear_ms']['train']:.1f} ms "
              f"({res['no_linear_share']['train']:.0%}) a training step")
    for name, why in res["not_applicable"].items():
        print(f"{name:<10} n/a: {why}")
    if not contention:
        return
    print("under contention (one core kept busy): busy ms, slowdown = busy / quiet time (median of per-round ratios), "
          "speed-up over dense under contention")
    head = (f"{'variant':<10} | {'infer':>8} {'slowdn':>6} {'x':>5} {'vs dense':<12} | "
            f"{'train':>8} {'slowdn':>6} {'x':>5} {'vs dense':<12}")
    print(head)
    print("-" * len(head))
    for row in res["rows"]:
        cells = []
        for kind in ("infer", "train"):
            r = row[kind]
            ok = "-" if r["slowdown_ok"] is None else ("no worse" if r["slowdown_ok"] else "WORSE")
            cells.append(f"{r['busy_ms']:>6.1f}ms {r['slowdown']:>5.2f}x {r['busy_speedup']:>4.2f}x {ok:<12}")
        print(f"{row['variant']:<10} | {cells[0]} | {cells[1]}")


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help="dense (always measured, the baseline) and plan names kron.presets.get_plan knows")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; 2 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; 32 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; 1 with --quick)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="attention implementation")
    p.add_argument("--contention", action=argparse.BooleanOptionalAction, default=True,
                   help="also time every round with a second process keeping one core busy (default on)")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="also time dense without its linear layers' arithmetic, for the Amdahl ceiling of each "
                        "variant (default on)")
    p.add_argument("--slowdown-tolerance", type=float, default=0.05,
                   help="a variant's slowdown under contention counts as no worse than dense's up to this "
                        "relative margin (default 0.05)")
    p.add_argument("--quick", action="store_true", help="tiny configs and batch/sequence: a smoke test")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"batch": 4, "seq_len": 128, "warmup": 2}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.batch < 1 or args.seq_len < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--batch, --seq-len, --repeats, --threads must be ≥ 1 and --warmup ≥ 0")
    args.variants = ["dense"] + [v for v in dict.fromkeys(args.variants) if v != "dense"]

    from kron.devices import pick_device

    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = _load()
    contention = args.contention
    print(f"device={device} ({_device_name(device)}, {os.cpu_count()} CPUs, load average {load}), "
          f"threads={torch.get_num_threads()}, dtype={args.dtype}, attn={args.attn}, batch={args.batch} x "
          f"seq_len={args.seq_len} = {args.batch * args.seq_len} tokens, warmup={args.warmup}, "
          f"repeats={args.repeats}, contention={'on' if contention else 'off'}, torch {torch.__version__}", flush=True)
    print("ms are medians; x = median per-round speed-up over dense; target: x ≥ "
          f"{SPEEDUP_OF_MAC_RATIO} · MAC ratio (MACs/token incl. attention scores and the LM head)", flush=True)
    t_start = time.perf_counter()
    results = []
    contender = Contender() if contention else None
    with tempfile.TemporaryDirectory(prefix="model_speed-") as tmp:
        specs = _quick_configs(Path(tmp)) if args.quick else MODELS
        try:
            if contender is not None:
                contender.start()
            for key in args.models:
                res = bench_model(key, specs[key], args, device, dtype, contender)
                gc.collect()  # the variants of this model go before the next model is built
                results.append(res)
                print_model(res, contention)
                sys.stdout.flush()
        finally:
            if contender is not None:
                contender.stop()

    judged = [(r, k) for res in results for r in res["rows"] for k in ("infer", "train") if r[k]["met"] is not None]
    kron_rows = [(r, k) for res in results for r in res["rows"] for k in ("infer", "train")
                 if r["kronecker"] and contention]
    summary = {
        "benchmark": "model_speed", "device": str(device), "device_name": _device_name(device),
        "threads": torch.get_num_threads(), "dtype": args.dtype, "attn": args.attn, "batch": args.batch,
        "seq_len": args.seq_len, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
        "contention": contention, "contention_mode": None if not contention else (
            "interleaved per round (SIGSTOP/SIGCONT)" if contender.can_pause else "restarted per busy pass"),
        "load_average_at_start": load, "load_average_at_end": _load(),
        "targets": {"speedup_ge_mac_ratio_times": SPEEDUP_OF_MAC_RATIO,
                    "kronecker_slowdown_le_dense_times": 1 + args.slowdown_tolerance if contention else None},
        "attention_scores_counted": "2 * seq_len * d_model per layer per token (full, also for causal)",
        "results": results,
        "all_mac_targets_met": all(r[k]["met"] for r, k in judged) if judged else None,
        "kronecker_slowdown_no_worse_than_dense": (all(r[k]["slowdown_ok"] for r, k in kron_rows)
                                                   if kron_rows else None),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
