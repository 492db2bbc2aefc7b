"""What several benchmarks share: the demo teacher's WikiText-2 trial and the fine-tuned MiniLM's SST-2 trial, so that
every evidence script trains its plans with the same settings and distillation budget (`search_vs_presets.py`,
`families.py`, `glue_minilm.py`), the pool that runs their plans, and the perplexity `init_quality.py` and
`autoplan.py` measure."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def demo_wikitext_trial(data: str, steps: int, lr: float) -> dict:
    """The trial config (without a plan) of the demo teacher distilled on WikiText-2 for `steps` steps: sequences of
    128 tokens, 400k training tokens, 64 validation blocks, ILKD (emb, att, hid 0.5) + 0.1 cross-entropy, data-aware
    init, one thread, no checkpoint."""
    return {
        "teacher": "demo",
        "data": {"source": str(Path(data).resolve()), "seq_len": 128, "max_train_tokens": 400_000, "val_blocks": 64},
        "stage1": {"lr": lr, "warmup_steps": 10, "batch_size": 8, "max_steps": steps,
                   "eval_every": max(steps // 3, 1), "eval_batches": 8, "early_stopping": None,
                   "distill": {"emb": 0.5, "att": 0.5, "hid": 0.5, "ce": 0.1}},
        "init": "data",
        "seed": 0,
        "threads": 1,
        "save_checkpoint": False,
    }


SHARED = Path(__file__).resolve().parents[2] / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
SST2 = SHARED / "data" / "glue" / "SST-2"


def ensure_minilm_teacher(out: str | Path, *, model: str | Path = MINILM, glue: str | Path = SST2,
                          minutes: float = 12.0, max_len: int = 48, threads: int = 2, lr: float = 1e-4) -> Path:
    """all-MiniLM-L6-v2 fine-tuned on SST-2 train by `kronsearch teacher finetune` (one epoch at most, `minutes` of
    training, batches of 32) into `out`; kept when `out` already holds a model."""
    out = Path(out)
    if not (out / "config.json").is_file():
        for path in (model, glue):
            if not Path(path).exists():
                raise SystemExit(f"not found: {path}")
        cmd = [sys.executable, "-m", "search.cli", "teacher", "finetune", "--model", str(model), "--task", "sst2",
               "--data", str(glue), "--out", str(out), "--epochs", "1", "--lr", str(lr), "--batch-size", "32",
               "--max-len", str(max_len), "--max-minutes", str(minutes), "--threads", str(threads)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def minilm_sst2_trial(teacher: str | Path, glue: str | Path, steps: int, lr: float, *, max_len: int = 48,
                      max_train_examples: int = 20_000) -> dict:
    """The trial config (without a plan) of the fine-tuned MiniLM distilled on SST-2 for `steps` steps: task
    distillation only (no text stage), batches of 32 sentences of at most `max_len` tokens, ILKD (emb, att, hid 0.5)
    + logits KD (temperature 2) + 0.02 cross-entropy on the labels, quality = SST-2 dev accuracy (all 872 sentences)
    after the last step (one evaluation: a dev pass costs as much as ~10 training steps here), data-aware init
    calibrated on SST-2 training sentences, one thread, no checkpoint."""
    return {
        "teacher": str(Path(teacher).resolve()),
        "stage1": None,
        "glue": {"task": "sst2", "source": str(Path(glue).resolve()), "max_len": max_len,
                 "max_train_examples": max_train_examples},
        "stage2": {"lr": lr, "warmup_steps": max(steps // 10, 1), "batch_size": 32, "max_steps": steps,
                   "eval_every": steps, "early_stopping": None,
                   "distill": {"emb": 0.5, "att": 0.5, "hid": 0.5, "ce": 0.02, "logits": 1.0, "temperature": 2.0}},
        "init": "data",
        "seed": 0,
        "threads": 1,
        "save_checkpoint": False,
    }


def perplexity(model, blocks, batch: int = 16) -> float:
    """exp(mean next-token NLL) over token blocks, as trials evaluate it (`trials.evaluate.evaluate_lm`)."""
    from trials.evaluate import evaluate_lm

    return evaluate_lm(model, blocks, batch, next(model.parameters()).device)["quality"]


def block_nlls(model, blocks, batch: int = 16):
    """The mean next-token NLL of each block (float64 tensor, one per block), in the same forward passes as
    `perplexity`: the blocks have equal lengths, so exp(mean of these) is the perplexity."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, blocks.shape[0], batch):
            ids = blocks[i : i + batch].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            out.append(nll.double().mean(dim=1).cpu())
    return torch.cat(out)


def paired_nll(a, b, z: float = 1.96, group: int = 16) -> dict:
    """Model a against model b on the same blocks (`block_nlls` of each): the mean per-token NLL difference d = a − b
    (negative: a is better), its standard error, the perplexity ratio exp(d) with its interval exp(d ± z·SE), in
    percent; verdict "better" or "worse" when the interval excludes 0, otherwise "tie". Paired: the blocks' own
    difficulty cancels. Neighbouring blocks of one text are not independent, so the SE is also taken over the means
    of runs of `group` consecutive blocks (batch means; where there are at least 8 such runs) and the larger of the
    two is used: correlation between neighbours widens the second, not the first."""
    import math

    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"paired_nll needs two equal sets of at least 2 blocks, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    diff = (a - b).double().flatten()
    n = diff.numel()
    d = float(diff.mean())
    se_blocks = float(diff.std(unbiased=True)) / math.sqrt(n)
    runs = n // group if group > 1 else 0
    se_runs = (float(diff[: runs * group].view(runs, group).mean(dim=1).std(unbiased=True)) / math.sqrt(runs)
               if runs >= 8 else None)
    se = max(se_blocks, se_runs or 0.0)
    lo, hi = d - z * se, d + z * se
    verdict = "better" if hi < 0 else "worse" if lo > 0 else "tie"
    pct = lambda x: 100.0 * math.expm1(x)  # noqa: E731
    return {"blocks": n, "d_nll": d, "se": se, "se_blocks": se_blocks, "se_runs": se_runs, "group": group,
            "ppl_change_pct": pct(d), "ci_pct": [pct(lo), pct(hi)], "z": z, "verdict": verdict}


def glue_correct(model, dev: dict, batch: int = 64):
    """Per dev example of a classification task (encoded by `trials.glue.encode_glue`), whether the model's argmax
    prediction is the label (bool tensor): the terms of the accuracy `trials.evaluate.evaluate_glue` reports."""
    import torch

    from trials.evaluate import batches

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for b in batches(dev, batch, shuffle=False, seed=0):
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            out.append((logits.argmax(-1) == b["labels"]).cpu())
    return torch.cat(out)


def mcnemar(a, b, alpha: float = 0.05) -> dict:
    """Classifier a against classifier b on the same examples (`glue_correct` of each): the accuracy change in
    points, the examples only a gets right and only b gets right, and McNemar's exact two-sided p (a binomial test
    on those discordant examples); verdict "better" or "worse" when p < alpha, otherwise "tie"."""
    from scipy.stats import binomtest

    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"mcnemar needs two equal, non-empty sets of examples, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    p = binomtest(a_only, n, 0.5).pvalue if n else 1.0
    verdict = "tie" if p >= alpha else "better" if a_only > b_only else "worse"
    return {"examples": int(a.numel()), "change_points": 100.0 * (a_only - b_only) / a.numel(), "a_only": a_only,
            "b_only": b_only, "p": float(p), "alpha": alpha, "verdict": verdict}


def _run_trial(cfg: dict, out: str) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from trials.trial import run_trial

    return run_trial(cfg, output_dir=out, progress=False)


def run_trials(todo: dict[str, tuple[dict, Path]]) -> None:
    """Run trial configs (label -> (config with its name, output folder)) two at a time; a trial that fails is
    printed with its label and the others go on."""
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = {label: pool.submit(_run_trial, cfg, str(out)) for label, (cfg, out) in todo.items()}
        for label, fut in futures.items():
            try:
                fut.result()
            except Exception as exc:  # one failing plan must not hide the others
                print(f"{label}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def search_config(name: str, trial: dict, storage: str | Path, *, trials: int, steps: int, size: str,
                  algorithm: str = "tpe", seeds=("auto",), max_damage: float | None = 0.5,
                  methods=("kronecker", "lowrank"), **space) -> dict:
    """A search config as the evidence scripts run it: per-layer, per-matrix choices (`layers: free`) among
    `methods` (and dense), the embedding's factor, TPE (or `algorithm`) + ASHA with a grace period of a third of the
    trial's steps, two trials at a time on one CPU each, objectives quality and `size`, `seed_plans` and the
    sensitivity prior (`space.prior.max_damage`; None: no prior). Extra keyword arguments go into `space`."""
    space = {"groups": ["embedding", "attention", "attention_output", "ffn_in", "ffn_out"], "layers": "free",
             "methods": list(methods), "ranks": [1], "min_compression": 2, "max_compression": 32,
             "max_aspect": 16, "max_shapes": 6, "allow_keep": True, **space}
    if max_damage is not None:
        space["prior"] = {"max_damage": max_damage}
    return {
        "name": name,
        "trial": trial,
        "space": space,
        "search": {"algorithm": algorithm, "num_samples": trials, "max_concurrent": 2, "resources": {"cpu": 1},
                   "seed": 0, "objectives": ["quality", size],
                   "asha": {"grace_period": max(steps // 3, 1), "reduction_factor": 2},
                   "storage": str(Path(storage).resolve()), "seed_plans": list(seeds),
                   "reference": False},  # the teacher is among the benchmark's reference trials
    }


def run_search(cfg: dict, out: Path) -> None:
    """`kronsearch search` on `cfg` (written next to its results as <name>.yaml); skipped when already run."""
    import yaml

    if any((Path(out) / cfg["name"]).glob("experiment_state-*.json")):
        return  # already run
    path = Path(out) / f"{cfg['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "search.cli", "search", str(path)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def add_teacher_args(p) -> None:
    """The evidence scripts' choice of teacher and its data (`--teacher demo|minilm`, --data, --glue, --teacher-dir)
    and the training budget every plan shares (--steps, --lr: defaults per teacher, see `resolve_teacher_args`)."""
    p.add_argument("--teacher", choices=["demo", "minilm"], default="demo",
                   help="demo: the bundled GPT-2 on WikiText-2; minilm: all-MiniLM-L6-v2 fine-tuned on SST-2")
    p.add_argument("--data", default=str(SHARED / "data" / "wikitext-2"), help="WikiText-2 (demo)")
    p.add_argument("--glue", default=str(SST2), help="SST-2 TSVs (minilm)")
    p.add_argument("--teacher-dir", default="runs/minilm-sst2-teacher",
                   help="the fine-tuned MiniLM (made there first when absent; minilm)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every plan (demo 60, minilm 40)")
    p.add_argument("--lr", type=float, default=None, help="demo 5e-4, minilm 1e-4")


def resolve_teacher_args(args, out: str) -> bool:
    """Fill the per-teacher defaults (steps, lr, --out as `runs/<out>[-minilm]`), make the MiniLM teacher when it is
    missing, check the demo's data; True for MiniLM."""
    minilm = args.teacher == "minilm"
    args.steps = args.steps or (40 if minilm else 60)
    args.lr = args.lr or (1e-4 if minilm else 5e-4)
    args.out = args.out or (f"runs/{out}-minilm" if minilm else f"runs/{out}")
    if minilm:
        ensure_minilm_teacher(args.teacher_dir, glue=args.glue)
    elif not Path(args.data).exists():
        raise SystemExit(f"data not found: {args.data}")
    return minilm


def evidence_trial(args) -> dict:
    """The trial config (without a plan) every plan of an evidence script shares, for `--teacher`."""
    if args.teacher == "minilm":
        return minilm_sst2_trial(args.teacher_dir, args.glue, args.steps, args.lr)
    return demo_wikitext_trial(args.data, args.steps, args.lr)
