#!/usr/bin/env bash
# Train the paper's five backbones from scratch on a CPU budget, resumably, then install them into
# the bundle. Each run checkpoints every epoch; re-running the script continues where it stopped.
#
# Usage: bash monai_bundle/scripts/train_paper_backbones.sh [RUNS_DIR] [BACKBONE ...]
#   RUNS_DIR   where checkpoints go (default ~/.cache/dicom-covid/runs; keep them out of git)
#   BACKBONE   subset to train (default: all five, cheapest first)
# Environment: IMAGE_SIZE, EPOCHS (default: the per-backbone CPU budget below), BATCH (default 32),
#              LR (default 1e-3), INSTALL=1 to copy each finished model into monai_bundle/models/.
#
# CPU budget per backbone (image side px, epochs), sized so that the four larger networks take
# about 25-35 min each on 2 CPU cores (measured train step at batch 32: ResNet50 1.7 s at 128 px,
# Inception-v3 0.9 s at 128 px, InceptionResNet-v2 1.2 s at 96 px, VGG-16 2.9 s at 96 px).
# With a GPU, raise both (e.g. IMAGE_SIZE=224 EPOCHS=30).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-$HOME/.cache/dicom-covid/runs}
shift || true
BACKBONES=("$@")
[ ${#BACKBONES[@]} -gt 0 ] || BACKBONES=(alexnet inception_v3 resnet50 inception_resnet_v2 vgg16)
budget() {  # echo "<image side> <epochs>" for a backbone
  case "$1" in
    alexnet) echo "128 20" ;;
    inception_v3) echo "128 8" ;;
    resnet50) echo "112 7" ;;
    inception_resnet_v2) echo "96 7" ;;
    vgg16) echo "64 6" ;;
    *) echo "128 10" ;;
  esac
}
mkdir -p "$RUNS"
for b in "${BACKBONES[@]}"; do
  read -r size epochs < <(budget "$b")
  echo "=== $b $(date -u +%FT%TZ) image ${IMAGE_SIZE:-$size} px, ${EPOCHS:-$epochs} epochs"
  args=(--backbone "$b" --output-dir "$RUNS/$b" --image-size "${IMAGE_SIZE:-$size}"
        --epochs "${EPOCHS:-$epochs}" --batch-size "${BATCH:-32}" --lr "${LR:-1e-3}" --patience 5
        --resume --no-progress)
  [ "${INSTALL:-0}" = 1 ] && args+=(--install)
  .venv/bin/dicom-covid train "${args[@]}"
done
