#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for dicom-covid:
#   - Debian packages: Orthanc (+ DICOMweb, GDCM), dcmtk, dicom3tools, nginx, Chromium and
#     PostgreSQL (its server binaries start throw-away clusters in the tests; only when missing);
#   - a Python 3.11 virtual environment in .venv with dicom-covid installed editable
#     (re-installed only when pyproject.toml changed).
# Usage: bash deploy/setup.sh            (safe to run repeatedly)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc orthanc-dicomweb orthanc-gdcm dcmtk dicom3tools nginx-light chromium postgresql)
missing=()
for pkg in "${APT_PACKAGES[@]}" ${EXTRA_APT_PACKAGES:-}; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian package starts a system Orthanc where it can; dicom-covid runs its own instances.

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.dicom-covid-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dicom-covid and its dependencies into .venv (torch is ~6 GB the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
# The browser test drives the system Chromium with playwright-core (no browser download).
if [ ! -d tests/viewer/node_modules/playwright-core ]; then
  echo "[setup] installing playwright-core for the browser test"
  (cd tests/viewer && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "[setup] ready: $(.venv/bin/dicom-covid --help >/dev/null && echo 'dicom-covid installed')"
