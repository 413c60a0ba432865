#!/usr/bin/env bash
# Fresh machine -> whole test suite: set up .venv, then run every test (core, modules, extension layout).
# Tests that need the real CT data look for ../shared/data beside the checkout (or $MIR_SHARED_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup-venv.sh
exec .venv/bin/python -m pytest -q "$@"
