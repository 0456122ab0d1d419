#!/usr/bin/env bash
# Train the paper's five backbones from scratch on a CPU budget, resumably, then install them into
# the bundle. Each run checkpoints every epoch; re-running the script continues where it stopped.
#
# Usage: bash monai_bundle/scripts/train_paper_backbones.sh [RUNS_DIR] [BACKBONE ...]
#   RUNS_DIR   where checkpoints go (default ~/.cache/dicom-covid/runs; keep them out of git)
#   BACKBONE   subset to train (default: all five, cheapest first)
# Environment: IMAGE_SIZE (default 128), EPOCHS (default 20), BATCH (default 32), LR (default 1e-3),
#              INSTALL=1 to copy each finished model into monai_bundle/models/.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-$HOME/.cache/dicom-covid/runs}
shift || true
BACKBONES=("$@")
[ ${#BACKBONES[@]} -gt 0 ] || BACKBONES=(alexnet resnet50 inception_v3 inception_resnet_v2 vgg16)
mkdir -p "$RUNS"
for b in "${BACKBONES[@]}"; do
  echo "=== $b $(date -u +%FT%TZ)"
  args=(--backbone "$b" --output-dir "$RUNS/$b" --image-size "${IMAGE_SIZE:-128}"
        --epochs "${EPOCHS:-20}" --batch-size "${BATCH:-32}" --lr "${LR:-1e-3}" --patience 5
        --resume --no-progress)
  [ "${INSTALL:-0}" = 1 ] && args+=(--install)
  .venv/bin/dicom-covid train "${args[@]}"
done
