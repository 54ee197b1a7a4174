"""Short benchmark runs for the docs site: writes docs/generated/benchmarks.md and benchmarks.png.

Runs two of the project's benchmarks in-process with fewer rounds than their defaults (so the whole docs
build stays within a few minutes on 2 cores) and records what they print, verbatim, with a bar chart of the
measured ratios. The ratios are from one short run on whatever machine builds the docs: the page says so.

    python scripts/docs_benchmarks.py OUTDIR
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import adam_vs_optax, autosgm_step  # noqa: E402
from benchmarks._timing import machine_line  # noqa: E402

# (title, module, argv, target ratio): each command is also what the page shows.
RUNS = [
    ("jaxopt_suite.adam / optax.adam (10M parameters in 100 tensors)", adam_vs_optax,
     ["--model", "large", "--rounds", "20"], 1.05),
    ("AutoSGM / suite Adam (5M parameters)", autosgm_step, ["--steps", "20", "--warmup", "5"], 1.5),
]


def main(outdir: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    sections, bars = [], []
    start = time.perf_counter()
    for title, module, argv, target in RUNS:
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            ratios = module.main(argv)
        seconds = time.perf_counter() - t0
        command = f"python -m {module.__name__} {' '.join(argv)}"
        sections.append(f"### {title}\n\n`{command}` ({seconds:.0f} s):\n\n```text\n{out.getvalue().rstrip()}\n```\n")
        for name, ratio in ratios.items():
            if module is autosgm_step and name == "adam":
                continue  # the baseline itself (1.0)
            label = f"adam, {name}" if module is adam_vs_optax else name
            bars.append((label, ratio, target))
        print(f"{command}: {seconds:.0f} s", file=sys.stderr)

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(bars) + 1.2))
    labels = [b[0] for b in bars]
    ax.barh(labels, [b[1] for b in bars], color="#4a7ab0")
    for i, (_, ratio, target) in enumerate(bars):
        ax.plot([target, target], [i - 0.4, i + 0.4], color="#c0392b", lw=2)
        ax.text(ratio, i, f" {ratio:.2f}×", va="center")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.invert_yaxis()
    ax.set_xlabel("median step time / baseline's (red: target)")
    ax.set_xlim(0, max(max(b[1] for b in bars), max(b[2] for b in bars)) * 1.25)
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "benchmarks.png"), dpi=110)

    header = (f"Measured while this site was built ({time.strftime('%Y-%m-%d %H:%M %Z')}, "
              f"{time.perf_counter() - start:.0f} s in all); {machine_line()}.\n\n"
              "![Measured ratios](generated/benchmarks.png)\n\n")
    with open(os.path.join(outdir, "benchmarks.md"), "w", encoding="utf-8") as f:
        f.write(header + "\n".join(sections))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/generated")
