#!/usr/bin/env bash
# Version-2 models and their leave-source-out evidence, on a 2-core CPU budget, resumably.
# Two lanes run side by side (one torch thread each); re-running continues where a run stopped.
#
# Usage: bash monai_bundle/scripts/train_v2.sh [RUNS_DIR] [LANE]
#   RUNS_DIR  checkpoints, prepared-image cache, held-out results (default runs/; keep out of git)
#   LANE      a, b or both (default both)
#
# Lane a: leave-source-out, both recipes at the same budget per group (160 px):
#         ieee8023+figure1+actualmed (700 train images per class, 4 epochs), then
#         nih_pneumonia+nih_normal+quex_opacity and c19r_covid+c19r_rsna (500 per class, 2 epochs).
# Lane b: the default model, transfer recipe on the whole version-2 train split (192 px,
#         3 epochs: 1 warm-up + 2 cosine; about 16 min an epoch on 2 free cores).
# Afterwards: dicom-covid crossval report RUNS/crossval --output monai_bundle/docs/crossval
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-runs}
LANE=${2:-both}
DC=.venv/bin/dicom-covid
cv() {  # cv GROUP RECIPE [extra args]
  local group=$1 recipe=$2
  shift 2
  [ -f "$RUNS/crossval/$recipe/$group/heldout.json" ] && return 0
  echo "=== crossval $recipe without $group $(date -u +%FT%TZ)"
  $DC crossval run --leave-out "$group" --recipe "$recipe" \
    --output-dir "$RUNS/crossval/$recipe/$group" --cache-dir "$RUNS/cache" --threads 1 \
    --no-progress "$@"
}
SMALL=(--epochs 2 --max-train-per-class 500)
lane_a() {
  cv ieee8023+figure1+actualmed transfer
  cv ieee8023+figure1+actualmed v1
  cv nih_pneumonia+nih_normal+quex_opacity transfer "${SMALL[@]}"
  cv nih_pneumonia+nih_normal+quex_opacity v1 "${SMALL[@]}"
  cv c19r_covid+c19r_rsna transfer "${SMALL[@]}"
  cv c19r_covid+c19r_rsna v1 "${SMALL[@]}"
}
lane_b() {
  if [ ! -f "$RUNS/v2/efficientnet_lite0/model.json" ]; then
    echo "=== default model (transfer, whole train split) $(date -u +%FT%TZ)"
    $DC train --backbone efficientnet_lite0 --recipe transfer --image-size 192 --epochs 3 \
      --lr 6e-4 --label-smoothing 0.1 --patience 3 --output-dir "$RUNS/v2/efficientnet_lite0" \
      --cache-dir "$RUNS/cache" --threads 2 --resume --no-progress
  fi
}
case "$LANE" in
  a) lane_a ;;
  b) lane_b ;;
  both) lane_a > "$RUNS/lane_a.log" 2>&1 & lane_b > "$RUNS/lane_b.log" 2>&1 & wait ;;
esac
