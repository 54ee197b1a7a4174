#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest; the long studies marked `slow`
# (full-length parity scenarios, the 20-seed stability study) run with `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup -m "not slow" "$@"
