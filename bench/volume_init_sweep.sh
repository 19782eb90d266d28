#!/usr/bin/env bash
# Issue 23 on a lent GPU: what moves 3-D Grad-CAM onto the lesion? Trains cnn3d variants with the
# CLI defaults otherwise, in parallel on one GPU, each through train -> index build -> eval
# (P@5) -> Grad-CAM at the feature volume (bench/volume_gradcam_peaks.peaks) -> explain-eval
# --methods gradcam (the 3-D pointing game, half-cell tolerance and strict).
#   variants: six variants on the CT phantom (seed 0); the pick (pre-registered in
#             volume_init_sweep.py: best Grad-CAM pointing among P@5 >= 0.85) and the
#             default then run on ct96 (48 x 96 x 96, .npy here to save the DICOM writing) and MR;
#   seeds:    --zero-init-residual with training seeds 1 and 2 on CT, and with --peak-pool both.
# The --cell-context variants ran at commit bfea852 (the option was removed after this sweep, so
# `variants` here runs the two that remain; the recorded JSON holds all six).
# Summaries go to $OUT as JSON; `python bench/volume_init_sweep.py record F...` merges them into
# bench/results/volume_init_sweep.json. From the repository root:
#   OUT=/tmp/sweep_out bash bench/volume_init_sweep.sh variants seeds
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
OUT=${OUT:-/tmp/sweep_out}
W=/tmp/sw
S="python3 bench/volume_init_sweep.py"
mkdir -p "$W" "$OUT"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia.txt" 2>&1
phantom() {  # name args...
  [ -f "$W/$1/manifest.csv" ] || python3 -m retrieval.cli phantom "$W/$1" --dim 3 --n 300 "${@:2}" >/dev/null 2>"$W/ph_$1.err"
}
one() {  # run-name phantom [train args]
  local name=$1 ph=$W/$2; shift 2; local d=$W/runs/$name; mkdir -p "$d"
  local s; s=$(date +%s)
  python3 -m retrieval.cli train "$ph/manifest.csv" --out "$d/model" "$@" >"$d/train.log" 2>&1
  echo "train_s $(( $(date +%s) - s ))" >>"$d/train.log"
  python3 -m retrieval.cli index build "$d/model" "$ph/manifest.csv" --out "$d/index" >"$d/index.log" 2>&1
  python3 -m retrieval.cli eval "$d/index" "$ph/manifest.csv" --json >"$d/eval.json" 2>"$d/eval.err"
  $S probe "$d/index" "$ph/manifest.csv" >"$d/probe.json" 2>"$d/probe.err"
  timeout "${EE_S:-100}" python3 -m retrieval.cli explain-eval "$d/index" "$ph/manifest.csv" \
    --methods gradcam --json --no-store --max-cases 45 --sanity-cases 0 >"$d/ee.json" 2>"$d/ee.err"
  echo "done $name at $(el) s"
}
for part in "$@"; do
  case "$part" in
    variants)
      phantom ct96 --seed 7 --modality ct --size 96 --depth 48 &
      phantom mr --seed 11 --modality mr &
      phantom ct --seed 0 --modality ct
      for v in $($S variants); do one "$v" ct $($S args "$v") & done
      wait
      $S summary "$W/runs" >"$OUT/variants_round1.json"
      best=$($S pick "$W/runs")
      echo "picked: $best"
      one "ct96_$best" ct96 $($S args "$best") &
      one "mr_$best" mr $($S args "$best") &
      one ct96_wide ct96 $($S args ct_wide) &
      one mr_wide mr $($S args ct_wide) &
      wait
      $S summary "$W/runs" >"$OUT/variants.json" ;;
    seeds)
      phantom ct --seed 0 --modality ct
      one ct_wide_zi_s1 ct --seed 1 --zero-init-residual &
      one ct_wide_zi_s2 ct --seed 2 --zero-init-residual &
      one ct_wide_zi_both ct --zero-init-residual --peak-pool both &
      wait
      $S summary "$W/runs" >"$OUT/seeds.json" ;;
    *) echo "unknown part $part (variants, seeds)" >&2 ;;
  esac
done
ls -la "$OUT"
