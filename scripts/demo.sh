#!/usr/bin/env bash
# Quick start: sets up .venv, trains the default config on the built-in synthetic data set,
# evaluates it on the held-out synthetic test split and says where the pictures are.
# Usage: bash scripts/demo.sh [WORKDIR]   (default runs/demo; rerunning resumes or re-evaluates)
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" ""
WORKDIR="${1:-runs/demo}"
python -m dermseg_jax.train --config=dermseg_jax/configs/default.py --workdir="$WORKDIR"
python -m dermseg_jax.evaluate --workdir="$WORKDIR" --checkpoint=best --split=test
echo
echo "[dermseg_jax] run: $WORKDIR  (metrics.jsonl, tensorboard/, checkpoints/)"
echo "[dermseg_jax] evaluation report and pictures: $(ls -d "$WORKDIR"/eval_test_* 2>/dev/null | tr '\n' ' ')"
