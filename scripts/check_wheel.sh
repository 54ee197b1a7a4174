#!/usr/bin/env bash
# Build the sdist and the wheel, check them with twine, then install the wheel into a new virtual environment
# that has only the core dependencies and run the optax quickstart there; then add torch and run the PyTorch
# quickstart. The examples run from a temporary folder, so they import the installed wheel, not the source
# tree; a library module that imported a test or reference package would fail here.
# Usage: bash scripts/check_wheel.sh   (uses ./.venv for build/twine, creates it if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/setup.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)

echo "== build"
rm -rf dist
.venv/bin/python -m build --outdir dist . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls -l dist
.venv/bin/python -m twine check --strict dist/*

wheel=$(ls dist/*.whl)
echo "== wheel contents: top-level packages"
.venv/bin/python - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))})
print(" ", tops)
unexpected = [t for t in tops if t not in ("jaxopt_suite", "torch_bridge")]
if unexpected:
    sys.exit(f"unexpected top-level entries in the wheel: {unexpected}")
PY

echo "== clean venv, core dependencies only"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "$wheel"
"$work/venv/bin/python" -m pip list --format=freeze | grep -iE '^(jax|jaxlib|optax|numpy|torch|flax|pytest)==' | tr '\n' ' '; echo
cp examples/quickstart_optax.py examples/quickstart_torch.py "$work/"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.util, sys
import jaxopt_suite
assert "site-packages" in jaxopt_suite.__file__, jaxopt_suite.__file__
for absent in ("torch", "flax", "pytest", "parity", "sklearn", "hypothesis"):
    if importlib.util.find_spec(absent) is not None:
        sys.exit(f"the clean venv unexpectedly has {absent}")
    if absent in sys.modules:
        sys.exit(f"importing jaxopt_suite imported {absent}")
print("  jaxopt_suite imported from", jaxopt_suite.__file__)
PY
"$work/venv/bin/python" quickstart_optax.py --steps 200
# without torch the bridge must say what is missing, not fail obscurely
if "$work/venv/bin/python" -c "import torch_bridge" 2> "$work/err.txt"; then
  echo "torch_bridge imported without torch installed"; exit 1
fi
tail -n 1 "$work/err.txt"

echo "== add torch (the local CPU build)"
"$work/venv/bin/python" -m pip install -q "torch==2.13.0"
"$work/venv/bin/python" quickstart_torch.py --steps 100
cd "$root"
echo "check_wheel: OK in $(( $(date +%s) - t0 )) s"
