#!/usr/bin/env bash
# Version-2 models and their leave-source-out evidence, on a 2-core CPU budget, resumably.
# Two lanes run side by side (one torch thread each); re-running continues where a run stopped.
#
# Usage: bash monai_bundle/scripts/train_v2.sh [RUNS_DIR] [LANE]
#   RUNS_DIR  checkpoints, prepared-image cache, held-out results (default runs/; keep out of git)
#   LANE      a, b or both (default both)
#
# Lane a: leave-source-out, both recipes at the same budget (160 px, 700 train images per class,
#         4 epochs): ieee8023+figure1+actualmed, then nih_pneumonia+nih_normal+quex_opacity.
# Lane b: the default model, transfer recipe on the whole version-2 train split (192 px,
#         5 epochs), then leave-out c19r_covid+c19r_rsna for both recipes.
# Afterwards: dicom-covid crossval report RUNS/crossval --output monai_bundle/docs/crossval
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-runs}
LANE=${2:-both}
DC=.venv/bin/dicom-covid
cv() {  # cv GROUP RECIPE
  [ -f "$RUNS/crossval/$2/$1/heldout.json" ] && return 0
  echo "=== crossval $2 without $1 $(date -u +%FT%TZ)"
  $DC crossval run --leave-out "$1" --recipe "$2" --output-dir "$RUNS/crossval/$2/$1" \
    --cache-dir "$RUNS/cache" --threads 1 --no-progress
}
lane_a() {
  cv ieee8023+figure1+actualmed transfer
  cv ieee8023+figure1+actualmed v1
  cv nih_pneumonia+nih_normal+quex_opacity transfer
  cv nih_pneumonia+nih_normal+quex_opacity v1
}
lane_b() {
  if [ ! -f "$RUNS/v2/efficientnet_lite0/model.json" ]; then
    echo "=== default model (transfer, whole train split) $(date -u +%FT%TZ)"
    $DC train --backbone efficientnet_lite0 --recipe transfer --image-size 192 --epochs 5 \
      --lr 6e-4 --label-smoothing 0.1 --patience 5 --output-dir "$RUNS/v2/efficientnet_lite0" \
      --cache-dir "$RUNS/cache" --threads 1 --resume --no-progress
  fi
  cv c19r_covid+c19r_rsna transfer
  cv c19r_covid+c19r_rsna v1
}
case "$LANE" in
  a) lane_a ;;
  b) lane_b ;;
  both) lane_a > "$RUNS/lane_a.log" 2>&1 & lane_b > "$RUNS/lane_b.log" 2>&1 & wait ;;
esac
