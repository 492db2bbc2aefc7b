"""One trial end to end: teacher → compressed student (SVD init) → ILKD stage(s) → evaluation → JSON summary.

`run_trial` is the unit the search runs thousands of times, so the teacher, tokenizer and data are cached per
process (a reused Ray actor pays for them once) and every evaluation rewrites `trial_summary.json` atomically:
a trial killed at any moment leaves its latest state on disk. What a trial starts from (the teacher, its data,
the compressed student) is trials/inputs.py; this module is the run: stages, evaluation, the summary.
"""
from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kron.fsutil import atomic_write_json
from kron.methods.quant.layer import disable_qat, enable_qat
from kron.vocab import SCHEMA, SUMMARY_NAME

from .config import StageConfig, TrialConfig, load_trial_config
from .distill import DistillWeights, forward_for_distillation, ilkd_loss
from .evaluate import batches, evaluate_glue, evaluate_kd, evaluate_lm
from .faults import default_hooks
from .hooks import TrialHooks
from .inputs import (TEACHER_QUALITY, build_student, clear_caches, is_causal_lm, load_glue_data, load_lm_data,
                     load_teacher, prepare_data, teacher_key)
from .teacher_cache import TeacherOutputs, teacher_cache, teacher_identity

__all__ = ["run_trial", "prepare_data", "TrialResult", "SUMMARY_NAME", "SCHEMA", "clear_caches"]

Reporter = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class TrialResult:
    summary: dict[str, Any]
    student: torch.nn.Module | None = None


class _Diverged(Exception):
    pass


# ----------------------------------------------------------------------------------------------- the run


class _Run:
    """State shared by the stages of one trial: counters, history, best checkpoint, summary file."""

    def __init__(self, cfg: TrialConfig, out_dir: Path | None, report: Reporter | None, progress: bool):
        self.cfg, self.out_dir, self.report_fn, self.progress = cfg, out_dir, report, progress
        self.t0 = time.time()
        self.step = 0
        self.tokens_seen = 0
        self.train_s = 0.0  # seconds in training steps (teacher and student passes, optimiser), evaluations excluded
        self.history: list[dict] = []
        self.best: float | None = None
        self.best_step: int | None = None
        self.checkpoint: str | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # lm_eval: the best weights, scored at the end
        self.summary: dict[str, Any] = {}

    def better(self, value: float, mode: str, min_delta: float = 0.0) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best is None:
            return True
        if mode == "min":
            return value < self.best * (1 - min_delta) if self.best > 0 else value < self.best
        return value > self.best * (1 + min_delta) if self.best > 0 else value > self.best

    def write(self, **updates) -> None:
        self.summary.update(updates)
        self.summary["history"] = self.history
        self.summary["wall_time_s"] = round(time.time() - self.t0, 3)
        self.summary["steps"], self.summary["tokens_seen"] = self.step, self.tokens_seen
        self.summary["train_step_s"] = round(self.train_s / self.step, 5) if self.step else None
        if self.out_dir is not None:
            atomic_write_json(self.out_dir / SUMMARY_NAME, self.summary)


def run_trial(config, report: Reporter | None = None, *, output_dir: str | os.PathLike | None = None,
              progress: bool | None = None, return_student: bool = False,
              hooks: TrialHooks | None = None) -> dict[str, Any]:
    """Run one trial and return its JSON summary (also written to `output_dir/trial_summary.json`).

    Args:
        config: a TrialConfig, a dict, or a YAML path.
        report: called as report(metrics, checkpoint_dir_or_None) after every evaluation (Ray Tune's hook).
        output_dir: where the summary and the best checkpoint go (None: nothing written).
        progress: show a progress bar (default: when no reporter is given).
        hooks: a `trials.hooks.TrialHooks` acting before training and on the loss function (default:
            `trials.hooks.default_hooks`, which does nothing unless KRONSEARCH_FAULT_INJECT is set).
    With an `lm_eval` section the final quality is the harness score (trials.harness) of the stage's best weights,
    which are put back into the student at the end; the stage still selects and stops early on val perplexity
    (summary `val_ppl`), and `lm_eval` holds every task's metrics.
    A NaN/inf loss ends the trial with status 'diverged'; a bad config raises ConfigError before any work;
    any other error during the run (a UserError from the data or plan, running out of memory -- recorded as
    "out of memory: ..." --) is recorded with status 'error' and re-raised.
    Testing aid: the environment variable KRONSEARCH_FAULT_INJECT ("raise:<pattern>,nan:<pattern>,oom:<pattern>")
    fails the trials whose name or output directory matches the pattern (see trials.faults); unset, it does nothing.
    """
    cfg = load_trial_config(config)
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, out_dir, report, report is None if progress is None else progress)
    run.hooks = hooks if hooks is not None else default_hooks(cfg, out_dir)
    run.summary = {
        "schema": SCHEMA, "trial_id": cfg.name or (out_dir.name if out_dir else "trial"), "search": None,
        "method": _summary_method(cfg), "label": cfg.label or cfg.name or _default_label(cfg), "status": "running", "error": None,
        "quality_name": cfg.quality_name, "quality_mode": cfg.quality_mode, "quality": None,
        "quality_at_init": None, "teacher_quality": None, "config": cfg.model_dump(mode="json"), "checkpoint": None,
    }
    if cfg.lm_eval is not None:  # lm-eval installed, its tasks known: a config error, before any work
        from .harness import check_tasks

        check_tasks(cfg.lm_eval.tasks, cfg.lm_eval.include_path)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    from kron.models import pick_device

    device = pick_device(cfg.device)
    run.summary["device"] = torch.cuda.get_device_name(device) + f" ({device})" if device.type == "cuda" else str(device)
    student = None
    try:
        if cfg.memory_check:  # the teacher's config on the meta device against the free memory: before loading
            from .memory import check_trial_memory

            need = check_trial_memory(cfg, device)
            run.summary["memory_estimate_gib"] = None if need is None else round(need["total"] / 2**30, 3)
        teacher, tokenizer = load_teacher(cfg, device)
        student, comp, plan = build_student(cfg, teacher)
        if cfg.gradient_checkpointing:
            from .memory import enable_checkpointing

            enable_checkpointing(student)
        # int8 layers train through fake quantisation; without it their int8 weights would stay as initialised
        qat = enable_qat(student) if cfg.qat else 0
        run.hooks.before_training(cfg, out_dir)
        student.to(device)
        if hasattr(student, "set_attn_implementation"):
            student.set_attn_implementation("eager")
        run.summary.update(_size_fields(comp, plan))
        run.summary["method"] = _summary_method(cfg, comp.get("plan_method"))
        run.plan = plan
        run.comp = comp
        run.layer_map = comp.get("layer_map")  # layerdrop: student layer i was teacher layer layer_map[i]
        run.teacher = teacher
        stages = []
        if cfg.stage1 is not None:
            stages.append(("lm", cfg.stage1))
        if cfg.stage2 is not None:
            stages.append(("glue", cfg.stage2))
        for kind, stage_cfg in stages:
            run.best, run.best_step = None, None  # each stage selects on its own validation metric
            _run_stage(run, kind, stage_cfg, teacher, student, tokenizer, device)
        if cfg.lm_eval is not None:
            _harness_quality(run, teacher, student, tokenizer, device)
        if qat:
            disable_qat(student)  # the int8 weights from the trained masters; what was evaluated and saved
        status = "complete"
    except _Diverged as exc:
        status = "diverged"
        run.write(status=status, error=str(exc))
    except Exception as exc:  # UserError and out-of-memory included: record, then re-raise
        # (BaseExceptions -- Ctrl-C, Ray stopping the trial -- pass: the search records those trials itself)
        run.write(status="error", error=_error_text(exc), traceback=traceback.format_exc(limit=20))
        raise
    if status == "complete":
        run.write(status="complete")
    return (run.summary, student) if return_student else run.summary


def _error_text(exc: BaseException) -> str:
    """The summary's error text; running out of (GPU or host) memory says so in plain words."""
    oom = isinstance(exc, MemoryError) or (
        hasattr(torch.cuda, "OutOfMemoryError") and isinstance(exc, torch.cuda.OutOfMemoryError))
    text = f"{type(exc).__name__}: {exc}"
    return f"out of memory: {text}" if oom else text


def _summary_method(cfg: TrialConfig, plan_method: str | None = None) -> str | None:
    """What produced the student: the config's method, or what its plan is (`plan_method`, known once the plan is
    resolved); a hand-designed preset (or any plan marked `reference: true`) is a reference point for analysis, not
    a search sample."""
    method = cfg.method or plan_method
    if method not in ("kronecker", "prune", "mixed") or cfg.plan is None:
        return method
    if cfg.reference or (cfg.plan.preset is not None and method != "mixed"):
        return "preset"
    return method


def _default_label(cfg: TrialConfig) -> str | None:
    if cfg.plan is not None and cfg.plan.preset is not None:
        return cfg.plan.preset
    if cfg.method == "lowrank" and cfg.lowrank_ratio is not None:
        return f"lowrank:{cfg.lowrank_ratio:g}"
    if cfg.method == "layerdrop":
        return f"layerdrop:{cfg.keep_layers}"
    if cfg.method == "teacher":
        return "teacher"
    return None


def _size_fields(comp: dict, plan) -> dict:
    fields = {
        "params": comp.get("params_after"),
        "params_excl_output_embedding": comp.get("params_after_excluding_output_embedding", comp.get("params_after")),
        "params_teacher": comp.get("params_before"),
        "compression_ratio": comp.get("compression_ratio"),
        "macs_per_token": comp.get("macs_per_token_after"),
        "macs_per_token_teacher": comp.get("macs_per_token_before"),
        "bytes": comp.get("bytes_after"),  # weight storage (kron.surgery.count_bytes); int8 weights count 1 byte
        "bytes_teacher": comp.get("bytes_before"),
        "plan": plan.to_dict() if plan is not None and hasattr(plan, "to_dict") else comp.get("plan"),
        "plan_summary": comp.get("plan_summary") or _plan_summary(comp),
        "plan_resolved": comp.get("plan_resolved") or _resolved_from_report(comp),
        "init_errors": {m["name"]: m.get("init_error") for m in comp.get("modules", []) if m.get("init_error") is not None},
    }
    return fields


def _plan_summary(comp: dict) -> str:
    """One line: how many matrices were factored, their compression range, and the embedding factor."""
    mods = comp.get("modules", [])
    if not mods:
        return "dense (nothing factored)"
    parts = []
    emb = [m for m in mods if m.get("kind") == "embedding"]
    mats = [m for m in mods if m.get("kind") != "embedding"]
    if mats:
        ratios = [m["params_before"] / m["params_after"] for m in mats if m.get("params_after")]
        layers = sorted({int(p) for m in mats for p in m["name"].split(".") if p.isdigit()})
        parts.append(f"{len(mats)} matrices in layers {layers} at {min(ratios):.3g}-{max(ratios):.3g}x")
    for m in emb:
        f = (m.get("spec") or {}).get("embedding_factor")
        parts.append(f"embedding f={f}")
    return "; ".join(parts)


def _resolved_from_report(comp: dict) -> dict:
    out = {}
    for m in comp.get("modules", []):
        spec = m.get("spec")
        out[m["name"]] = spec if spec is not None else "keep"
    return out


def _evaluate(run: _Run, kind: str, student, eval_data, stage: StageConfig, device) -> dict:
    if kind == "lm" and is_causal_lm(student):
        return evaluate_lm(student, eval_data, stage.batch_size, device, stage.eval_batches)
    if kind == "lm":
        weights = DistillWeights(**stage.distill.model_dump(exclude={"layer_map"}))
        return evaluate_kd(student, run.teacher, eval_data, weights, stage.batch_size, device, stage.eval_batches,
                           _layer_map(run, stage), _head_map(run, student))
    return evaluate_glue(student, eval_data, run.cfg.glue.task, stage.batch_size, device, stage.eval_batches)


def _head_map(run: _Run, student) -> list | None:
    """Per layer, the teacher heads a structurally pruned student kept (None: it has all of them), so attention
    ILKD compares each remaining head with the head it was; computed once per trial."""
    if not hasattr(run, "head_map"):
        run.head_map = None
        if run.cfg.builds_by_plan:
            from kron.methods.prune.structure import kept_heads

            heads = kept_heads(student)
            run.head_map = heads if any(h is not None for h in heads) else None
    return run.head_map


def _layer_map(run: _Run, stage: StageConfig) -> list[int] | None:
    """The stage's ILKD layer_map if it gives one, else the one layer dropping implies (None: same depth)."""
    if stage.distill.layer_map is not None:
        return stage.distill.layer_map
    return getattr(run, "layer_map", None)


def _teacher_quality(run: _Run, kind: str, teacher, eval_data, stage: StageConfig, device) -> float | None:
    """The teacher's score on the same validation data (cached per process: the search evaluates it once)."""
    if kind == "lm" and not is_causal_lm(teacher):
        return None  # the encoder's stage-1 metric is a distance to itself
    cfg = run.cfg
    key = ("teacher_quality", cfg.teacher, kind, cfg.data.model_dump_json(),
           cfg.glue.model_dump_json() if cfg.glue else None, stage.batch_size, stage.eval_batches)
    if key not in TEACHER_QUALITY:
        TEACHER_QUALITY[key] = _evaluate(run, kind, teacher, eval_data, stage, device)["quality"]
    return TEACHER_QUALITY[key]


def _run_stage(run: _Run, kind: str, stage: StageConfig, teacher, student, tokenizer, device) -> None:
    cfg = run.cfg
    if kind == "lm":
        train, val = load_lm_data(cfg, teacher, tokenizer, device)
        train_iter = batches({"input_ids": train}, stage.batch_size, shuffle=True, seed=cfg.seed)
        eval_data = val
        mode = "min"  # perplexity, or the held-out ILKD loss for encoders
    else:
        train_t, dev_t = load_glue_data(cfg, tokenizer)
        train_iter = batches(train_t, stage.batch_size, shuffle=True, seed=cfg.seed)
        eval_data = dev_t
        mode = "max"
    final_stage = kind == ("glue" if cfg.stage2 is not None else "lm")
    weights = DistillWeights(**stage.distill.model_dump(exclude={"layer_map"}))
    needs_teacher = any((weights.emb, weights.att, weights.hid, weights.logits))
    loss_fn = run.hooks.loss_fn(ilkd_loss)
    teacher_forward = _teacher_forward(run, teacher, device, keep_logits=weights.logits > 0)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    from .memory import autocast, grad_scaler

    scaler = grad_scaler(cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / stage.warmup_steps) if stage.warmup_steps else 1.0)

    since_best = 0

    def evaluate_and_report(stage_step: int, losses: dict[str, float]) -> bool:
        """Evaluate, log, keep the best checkpoint; return True when early stopping says stop."""
        nonlocal since_best
        metrics = _evaluate(run, kind, student, eval_data, stage, device)
        q = metrics["quality"]
        if stage_step == 0 and run.summary.get("quality_at_init") is None and final_stage and cfg.lm_eval is None:
            run.summary["quality_at_init"] = q
            run.summary["teacher_quality"] = _teacher_quality(run, kind, teacher, eval_data, stage, device)
        improved = run.better(q, mode, stage.early_stopping.min_delta if stage.early_stopping else 0.0)
        if improved:
            run.best, run.best_step = q, run.step
            if final_stage:
                # with lm_eval the quality is the harness score, known at the end; val perplexity only selects
                run.summary["quality" if cfg.lm_eval is None else "val_ppl"] = q
                run.summary["throughput_tokens_per_s"] = metrics.get("throughput_tokens_per_s")
                _save_best(run, student)
                if cfg.lm_eval is not None:
                    run.best_state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        record = {"stage": kind, "step": run.step, "tokens_seen": run.tokens_seen,
                  "wall_time_s": round(time.time() - run.t0, 3), **metrics,
                  **{f"loss_{k}" if k != "loss" else k: v for k, v in losses.items()}}
        run.history.append(record)
        run.write()
        if run.report_fn is not None:
            rep = {**record, "quality_name": cfg.quality_name, "params": run.summary["params"],
                   "compression_ratio": run.summary["compression_ratio"],
                   "macs_per_token": run.summary["macs_per_token"],
                   "best_quality": run.summary["quality"] if final_stage else None}
            run.report_fn(rep, None)
        since_best = 0 if improved else since_best + 1
        return stage.early_stopping is not None and since_best >= stage.early_stopping.patience

    if evaluate_and_report(0, {}):
        return
    t_stage = time.time()
    acc: dict[str, float] = {}
    n_acc = 0
    bar = None
    if run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stage.max_steps, desc=f"stage {kind}", unit="step", leave=False)
    try:
        for s in range(1, stage.max_steps + 1):
            t_step = time.perf_counter()
            student.train()
            batch = {k: v.to(device) for k, v in next(train_iter).items()}
            mask = batch.get("attention_mask")
            labels = batch.get("labels")
            if kind == "lm" and is_causal_lm(student):
                labels = batch["input_ids"]
            t_out = None
            if needs_teacher:  # cross-entropy-only training (a baseline) skips the teacher's forward pass
                with torch.no_grad():
                    t_out = teacher_forward(batch["input_ids"], mask)
            with autocast(cfg, device):
                s_out = forward_for_distillation(student, batch["input_ids"], mask, labels)
                out = loss_fn(s_out, t_out, weights, attention_mask=mask, layer_map=_layer_map(run, stage),
                              ce_loss=getattr(s_out, "loss", None), head_map=_head_map(run, student))
            if not torch.isfinite(out.loss):
                raise _Diverged(f"non-finite loss {out.loss.item()} at step {run.step + 1} (stage {kind}); "
                                f"components {out.parts}")
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                out.loss.backward()
                if stage.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                opt.step()
            else:  # float16: scaled gradients, unscaled for the clip; a step with inf gradients is skipped
                scaler.scale(out.loss).backward()
                if stage.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                scaler.step(opt)
                scaler.update()
            sched.step()
            run.train_s += time.perf_counter() - t_step
            run.step += 1
            run.tokens_seen += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            acc["loss"] = acc.get("loss", 0.0) + out.loss.item()
            for k, v in out.parts.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss.item():.3f}", best=run.best)
            out_of_time = stage.max_minutes is not None and time.time() - t_stage > stage.max_minutes * 60
            if s % stage.eval_every == 0 or s == stage.max_steps or out_of_time:
                stop = evaluate_and_report(s, {k: v / n_acc for k, v in acc.items()})
                acc, n_acc = {}, 0
                if stop or out_of_time:
                    break
    finally:
        if bar is not None:
            bar.close()


def _harness_quality(run: _Run, teacher, student, tokenizer, device) -> None:
    """The trial's quality from lm-evaluation-harness (`cfg.lm_eval`): the best weights of the stage are put back
    (early stopping ran on past them) and scored; the teacher is scored once per process on the same tasks."""
    from .harness import harness_quality, run_harness

    lm = run.cfg.lm_eval
    if run.best_state is not None:
        student.load_state_dict(run.best_state)
        run.best_state = None

    def score(model) -> tuple[float, dict]:
        result = run_harness(model, tokenizer, lm.tasks, limit=lm.limit, batch_size=lm.batch_size, device=device,
                             include_path=lm.include_path, num_fewshot=lm.num_fewshot)
        return harness_quality(result, lm.tasks, lm.metric), result

    quality, result = score(student)
    if run.cfg.method == "teacher":  # the student is the teacher: no second run
        teacher_q = quality
    else:
        key = ("teacher_quality", run.cfg.teacher, "lm_eval", lm.model_dump_json())
        if key not in TEACHER_QUALITY:
            TEACHER_QUALITY[key] = score(teacher)[0]
        teacher_q = TEACHER_QUALITY[key]
    run.write(quality=quality, teacher_quality=teacher_q, lm_eval=result)


def _teacher_forward(run: _Run, teacher, device, keep_logits: bool) -> Callable:
    """(input_ids, mask) -> the teacher's distillation outputs: through this process's teacher cache when
    `teacher_cache` is on (a batch an earlier trial here already saw is not recomputed; trials.teacher_cache), else a
    forward pass. The summary's `teacher_batches` counts the batches reused and computed."""
    tc = run.cfg.teacher_cache_config
    counts = run.summary.setdefault("teacher_batches", {"reused": 0, "computed": 0})
    if not tc.enabled:
        def plain(ids, mask):
            counts["computed"] += 1
            return forward_for_distillation(teacher, ids, mask)

        return plain
    cache = teacher_cache()
    cache.configure(tc.memory_mb, tc.disk_mb, tc.disk_dir)
    ctx = teacher_identity(teacher_key(run.cfg, device), teacher)

    def cached(ids, mask):
        missed = cache.misses
        out = cache.get_or_compute(
            ctx, ids, mask, lambda: TeacherOutputs.from_model_output(forward_for_distillation(teacher, ids, mask),
                                                                     keep_logits), keep_logits)
        counts["computed" if cache.misses > missed else "reused"] += 1
        return out

    return cached


def _save_best(run: _Run, student) -> None:
    if run.out_dir is None or not run.cfg.save_checkpoint:
        return
    if run.cfg.method == "layerdrop":  # a plain transformers model with fewer layers: save_pretrained
        from kron.baselines import save_layerdrop

        save_layerdrop(student, run.out_dir / "checkpoint", layer_map=run.layer_map, report=run.comp)
    else:
        from kron.io import save_compressed

        save_compressed(student, run.plan, run.out_dir / "checkpoint")
    run.summary["checkpoint"] = "checkpoint"
