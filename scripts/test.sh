#!/usr/bin/env bash
# Install everything the tests need, then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
ruff check .
ruff format --check .
mypy cxr_monai server
python -m pytest -q "$@"
