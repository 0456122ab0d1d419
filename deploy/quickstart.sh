#!/usr/bin/env bash
# Set up (if needed) and classify the bundled sample chest DICOMs with the default model.
# Usage: bash deploy/quickstart.sh [PATH ...]   (default: sample_dicoms/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
if [ $# -eq 0 ]; then set -- sample_dicoms/; fi
exec .venv/bin/dicom-covid predict "$@"
