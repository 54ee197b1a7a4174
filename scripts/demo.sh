#!/usr/bin/env bash
# Set up (if needed) and run the main job: every registered optimizer trains a digits MLP on both backends.
# Writes results/digits_results.md, results/digits_results.json and results/digits_loss.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m examples.digits_comparison "$@"
