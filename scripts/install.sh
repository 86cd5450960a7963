#!/usr/bin/env bash
# Install cxr-monai and everything it needs into the active Python (use a venv if you prefer).
# Usage: bash scripts/install.sh [--dev]   (--dev adds the test tools and the Debian DICOM tools)
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."

# torch first, at the version this project is tested with: on machines that carry a local copy
# pip takes it from there; elsewhere this is an ordinary download.
python -c "import torch, torchvision" 2>/dev/null || pip install --quiet torch==2.14.1 torchvision==0.29.1

if [[ "${1:-}" == "--dev" ]]; then
    pip install --quiet -e ".[dev]"
    # dcmtk (dcmcjpeg, dcmcjpls) writes the JPEG lossless / JPEG-LS test files;
    # dicom3tools (dciodvfy) validates the DICOM we write.
    if ! command -v dcmcjpls >/dev/null || ! command -v dciodvfy >/dev/null; then
        if [[ $(id -u) -eq 0 ]]; then
            apt-get update -qq && apt-get install -y -qq dcmtk dicom3tools >/dev/null
        else
            echo "note: install dcmtk and dicom3tools (apt) for the full test suite; those tests skip otherwise" >&2
        fi
    fi
else
    pip install --quiet -e .
fi
