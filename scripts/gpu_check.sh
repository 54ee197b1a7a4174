#!/usr/bin/env bash
# CUDA check of the torch bridge (parity of every class vs torch.optim, the torch-semantics tests on CUDA, the
# Adam benchmark vs torch fused=True), printed as one table; see scripts/gpu_check.py. Needs CUDA builds of
# torch and JAX already installed (installs nothing, no network); about 8 minutes at most. Without CUDA it
# exits with status 2 and says why. Extra arguments go to gpu_check.py (e.g. --parts parity,bench).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
