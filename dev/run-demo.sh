#!/usr/bin/env bash
# Fresh machine -> main job: set up .venv, then load a CT (a generated chest phantom unless --input is given),
# check and preprocess it, and write a Slicer scene (.mrb), a PNG preview and a JSON summary to ./out (or --output).
# Usage: dev/run-demo.sh [--input CT_FILE_OR_DICOM_FOLDER ...] [--output DIR] [other options of `prepare --help`]
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup-venv.sh
exec .venv/bin/python -m RecognitionCore.cli prepare "$@"
