#!/usr/bin/env bash
# Install the version-2 default model from a finished run of train_v2.sh and write its evidence:
# abstention facts, test-split report (with the adult and per-source tables and the shortcut
# control), abstention report, leave-source-out table.
# Usage: [DEFAULT=1] bash monai_bundle/scripts/install_v2.sh [RUNS_DIR]   (DEFAULT=1: make it the default model)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-runs}
DC=.venv/bin/dicom-covid
NAME=efficientnet_lite0_v2
DOCS=monai_bundle/docs/${NAME}_test
.venv/bin/python - "$RUNS/v2/efficientnet_lite0" "$NAME" <<'PY'
import os
import sys
from dicom_covid.bundle import Bundle, install_model, set_model_facts

run, name = sys.argv[1], sys.argv[2]
install_model(run, make_default=os.environ.get("DEFAULT") == "1", name=name)
set_model_facts(Bundle(), name, {"title": "EfficientNet-Lite0 v2 (transfer recipe)"})
PY
$DC abstention fit --model "$NAME" --install --max-train-per-class 400 --no-progress
mkdir -p "$DOCS"
$DC evaluate --model "$NAME" --split test --report-dir "$DOCS" --output-json "$DOCS/metrics.json"
$DC abstention evaluate --model "$NAME" --output "$DOCS" --no-progress
$DC crossval report "$RUNS/crossval" --output monai_bundle/docs/crossval
