#!/usr/bin/env bash
# One command on a fresh Debian machine: set up dicom-covid (deploy/setup.sh), then run
# `dicom-covid demo` (installs nginx-light and the prebuilt OHIF viewer on first use, starts
# Orthanc + OHIF + dicom-covid serve on loopback, sends sample studies, prints the viewer URL).
# Usage: bash deploy/demo/demo.sh [dicom-covid demo options]   e.g. --all-samples, --stop
# RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/setup.sh
exec .venv/bin/dicom-covid demo "$@"
