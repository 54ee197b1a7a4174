#!/usr/bin/env bash
# Set up (if needed), regenerate docs/generated/ from the project's own commands, and build the site into
# site/ with mkdocs --strict (any warning fails the build). About 5 minutes on 2 cores.
#   docs/generated/parity_*.md  python -m parity (JAX implementations vs their references; PARITY_FAMILIES)
#   docs/generated/benchmarks.* scripts/docs_benchmarks.py (short runs of benchmarks/ scripts, a figure)
# The quickstart snippets in docs/snippets/ are run too, so the code the site shows is code that works.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export PYTHONPATH=.
export NO_MKDOCS_2_WARNING=1
out=docs/generated
rm -rf "$out" site
mkdir -p "$out"
start=$SECONDS

# Two parity processes in parallel (one per core). A FAIL row does not stop the build: the page shows it.
pids=()
for family in ${PARITY_FAMILIES:-torch autosgm}; do
  "$PY" -m parity --backend jax --family "$family" --markdown "$out/parity_$family.md" > "$out/parity_$family.log" 2>&1 &
  pids+=($!)
done
for snippet in docs/snippets/*.py; do
  echo "running $snippet"
  "$PY" -W ignore "$snippet" > "$out/$(basename "$snippet" .py).log" 2>&1 || { cat "$out/$(basename "$snippet" .py).log"; exit 1; }
done
"$PY" scripts/docs_benchmarks.py "$out"
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || true
done
for family in ${PARITY_FAMILIES:-torch autosgm}; do
  tail -n 1 "$out/parity_$family.log"
  [ -s "$out/parity_$family.md" ] || { echo "parity --family $family wrote no table:"; tail -n 20 "$out/parity_$family.log"; exit 1; }
done
{
  for family in ${PARITY_FAMILIES:-torch autosgm}; do
    printf '## Family `%s`\n\n' "$family"
    cat "$out/parity_$family.md"
    printf '\n'
  done
} > "$out/parity.md"

.venv/bin/mkdocs build --strict -d site
echo "docs built into site/ in $((SECONDS - start)) s"
