#!/usr/bin/env bash
# Create (or reuse) .venv at the repo root with everything the command line, the tests and the benchmarks need.
# torch comes first and pinned: the CPU wheel 2.13.0; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -r requirements.txt
python -c "import torch, monai, SimpleITK, slicer; print('environment ready: torch', torch.__version__, '| monai', monai.__version__)" 2>/dev/null | tail -1
