#!/usr/bin/env bash
# Rebuild the bundled demo teacher (kron/demo_teacher/): a 4-layer GPT-2 trained from scratch on WikiText-2,
# about three epochs (2,000 steps of 32 x 128 tokens, cosine decay over them) on one CPU thread, at most 125 minutes;
# the checkpoint with the best validation loss is kept. Needs the shared data checkout (../shared/data next to the
# repo) or DATA=...; INSTALL=0 trains without replacing the bundle.
# Release 1 (40 minutes, 631 steps, 0.96 epochs) ran with --max-steps 100000 --max-minutes 40.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/work/shared/data/wikitext-2}
OUT=${OUT:-/tmp/demo_teacher_out}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

python -m search.cli teacher train --data "$DATA" --out "$OUT" \
    --vocab-size 8192 --n-layer 4 --n-embd 256 --n-head 4 --n-positions 256 --seq-len 128 \
    --batch-size 32 --lr 1e-3 --warmup-steps 100 --max-steps 2000 --max-minutes 125 \
    --eval-every 100 --seed 0 --threads 1

# The bundle: weights, config and tokenizer (the MODEL_CARD.md in kron/demo_teacher/ is edited by hand).
[ "${INSTALL:-1}" = 1 ] || exit 0
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    [ -f "$OUT/$f" ] && install -m 644 "$OUT/$f" kron/demo_teacher/
done
