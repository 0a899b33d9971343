#!/usr/bin/env bash
# Which choice of dermseg_jax/configs/isic2018.py matters at a small budget (issue 17)?
# The recipe scaled to configs/default.py's budget (width 0.125, 80 px crops, 96 px evaluation,
# 400 steps, ~3 min each on 2 cores), then one choice reverted per run, plus a seed repeat.
# Results: docs/ablation_isic2018.md ("Diagnosis"); each run's test metrics in
# OUT/<run>/eval_test_400.json.
# Usage: bash scripts/diagnose_isic2018_recipe.sh [OUT]   (default runs/diagnosis)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/diagnosis}"
DATA="$OUT/data"
[ -d "$DATA" ] || python -m dermseg_jax.data.prepare --format synthetic --n 160 --n_val 32 \
  --n_test 32 --seed 0 --out "$DATA"
BASE=(--config=dermseg_jax/configs/isic2018.py "--config.data.data_dir=$DATA"
  --config.model.width=0.125 --config.data.crop_size=80 --config.data.resize_shorter=96
  --config.data.eval_size=96 --config.train.batch_size=8 --config.train.steps_per_epoch=20
  --config.train.num_train_steps=400 --config.optim.warmup_steps=20
  --config.eval.every_steps=400 --config.checkpoint.every_steps=400
  --config.optim.step_size=1000 --config.optim.encoder_lr_without_init=0
  --config.model.presence_head=False --config.eval.inference=resize --config.eval.tta=False
  --config.eval.fit_thresholds=False)  # the recipe as it was before issue 17
run() {
  local name=$1; shift
  [ -f "$OUT/$name/eval_test_400.json" ] && return
  python -m dermseg_jax.train "${BASE[@]}" "--workdir=$OUT/$name" "$@"
  python -m dermseg_jax.evaluate "--workdir=$OUT/$name" --checkpoint=latest --split=test \
    --num_examples=0
}
run a_isic2018
run a2_seed1 --config.train.seed=1
run b_lr1e-3 --config.optim.lr_l1=1e-3 --config.optim.lr_l2=1e-3 --config.optim.lr_l3=1e-3
run c_bn0.9 --config.model.bn_momentum=0.9
run d_bce --config.loss.name=bce
run e_noposw --config.loss.weights_from_data=False
run f_adam_noclip --config.optim.optimizer=adam --config.optim.grad_clip_norm=1e9 \
  --config.optim.weight_decay=1e-6
