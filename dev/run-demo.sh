#!/usr/bin/env bash
# Fresh machine -> main job: set up .venv, then run NoduleDetect on a CT (a generated chest phantom unless --input is
# given) and write, per case, a Slicer scene (.mrb) with the findings, a findings CSV and a PNG, plus LUNA16-style
# detections.csv for all cases, to ./out (or --output).
# Usage: dev/run-demo.sh [--input CT_FILE_OR_DICOM_FOLDER ...] [--output DIR] [other options of `nodules --help`]
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup-venv.sh
exec .venv/bin/python -m RecognitionCore.cli nodules "$@"
