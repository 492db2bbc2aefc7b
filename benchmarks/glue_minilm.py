"""A real pre-trained encoder: all-MiniLM-L6-v2 fine-tuned on SST-2 as the teacher, a KroneckerBERT-style student.

    python benchmarks/glue_minilm.py [--model ../shared/models/all-MiniLM-L6-v2] [--glue ../shared/data/glue/SST-2]

1. Teacher: `kronsearch teacher finetune` of MiniLM (6 layers, 384 wide, FFN 1536) on SST-2 train (skipped when
   --teacher-dir already holds it).
2. Student: the KroneckerBERT8 structure scaled to a 384-wide model (the paper's shapes are for 768): every layer's
   attention Q, K, V, O at A 192x192 ⊗ B 2x2 (4x), the FFN at A 8x2 ⊗ B 192x192 and its swapped shape (16x), the
   word embedding at f = 8; pooler and classifier dense.
3. Distillation: stage 1 ILKD on WikiText-2 text (no labels), then stage 2 task ILKD + logits KD + CE on SST-2;
   the SST-2 dev accuracy of the teacher, of the student at SVD init and after distillation.
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import SHARED, ensure_minilm_teacher


def student_plan() -> dict:
    return {"rules": [
        {"select": "re:.*attention\\.self\\.(query|key|value)", "shape": [192, 192, 2, 2]},
        {"select": "attention.output.dense", "shape": [192, 192, 2, 2]},
        {"select": "intermediate.dense", "shape": [8, 2, 192, 192]},
        {"select": "re:.*layer\\.\\d+\\.output\\.dense", "shape": [2, 8, 192, 192]},
        {"select": "embeddings.word_embeddings", "embedding_factor": 8},
    ]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--glue", default=str(SHARED / "data" / "glue" / "SST-2"))
    p.add_argument("--text", default=str(SHARED / "data" / "wikitext-2"))
    p.add_argument("--teacher-dir", default="runs/minilm-sst2-teacher")
    p.add_argument("--teacher-minutes", type=float, default=8.0)
    p.add_argument("--stage1-minutes", type=float, default=3.0)
    p.add_argument("--stage2-minutes", type=float, default=7.0)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench_glue_minilm")
    args = p.parse_args(argv)
    for path in (args.model, args.glue, args.text):
        if not Path(path).exists():
            raise SystemExit(f"not found: {path}")
    teacher = ensure_minilm_teacher(args.teacher_dir, model=args.model, glue=args.glue, minutes=args.teacher_minutes,
                                    max_len=args.max_len, threads=args.threads, lr=5e-5)

    from trials.trial import run_trial

    cfg = {
        "name": "minilm-kroneckerbert8-style",
        "teacher": str(teacher),
        "plan": student_plan(),
        "data": {"source": args.text, "seq_len": args.max_len, "val_blocks": 64},
        "stage1": {"lr": 5e-4, "batch_size": 16, "max_steps": 100_000, "max_minutes": args.stage1_minutes,
                   "eval_every": 50, "early_stopping": None,
                   "distill": {"emb": 0.5, "att": 0.5, "hid": 0.5, "ce": 0.0}},
        "glue": {"task": "sst2", "source": args.glue, "max_len": args.max_len},
        "stage2": {"lr": 1e-4, "batch_size": 32, "max_steps": 100_000, "max_minutes": args.stage2_minutes,
                   "eval_every": 50, "early_stopping": {"patience": 4},
                   "distill": {"emb": 0.5, "att": 0.5, "hid": 0.5, "ce": 0.5, "logits": 1.0, "temperature": 2.0}},
        "threads": args.threads,
        "seed": 0,
    }
    summary = run_trial(cfg, output_dir=args.out, progress=False)
    teacher_acc = _teacher_accuracy(teacher, args.glue, args.max_len)
    glue_hist = [h for h in summary["history"] if h["stage"] == "glue"]
    init_acc = glue_hist[0]["quality"] if glue_hist else None
    print(f"{'model':36s} {'params':>12s} {'SST-2 dev acc':>14s}")
    print(f"{'teacher (MiniLM-L6 fine-tuned)':36s} {summary['params_teacher']:>12,d} {teacher_acc:>14.4f}")
    print(f"{'student at SVD init (after stage 1)':36s} {summary['params']:>12,d} {init_acc:>14.4f}")
    print(f"{'student after task ILKD':36s} {summary['params']:>12,d} {summary['quality']:>14.4f}")
    print(json.dumps({"benchmark": "glue_minilm", "task": "sst2", "teacher_accuracy": teacher_acc,
                      "student_accuracy_at_stage2_start": init_acc, "student_accuracy": summary["quality"],
                      "params_teacher": summary["params_teacher"], "params_student": summary["params"],
                      "compression_ratio": summary["compression_ratio"], "status": summary["status"],
                      "steps": summary["steps"], "wall_s": summary["wall_time_s"]}))
    return 0


def _teacher_accuracy(teacher: Path, glue_dir: str, max_len: int) -> float:
    """SST-2 dev accuracy of the fine-tuned teacher, on the same encoding the student is evaluated with."""
    import torch

    from kron.models import load_model, load_tokenizer
    from trials.glue import encode_glue, load_glue
    from trials.evaluate import evaluate_glue

    model = load_model(str(teacher), task="sequence-classification", device="cpu").eval()
    data = encode_glue(load_glue("sst2", glue_dir, "dev"), load_tokenizer(str(teacher)), max_len)
    return evaluate_glue(model, data, "sst2", 64, torch.device("cpu"))["quality"]


if __name__ == "__main__":
    raise SystemExit(main())
