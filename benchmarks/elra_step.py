"""ELRA step time through the torch bridge vs the PyPI package ``elra`` 0.0.5, in one interleaved run.

5M parameters in 20 tensors (250k each), fixed gradients, a slowly decreasing loss (so every call is an
accepted step). Per round each optimizer takes one step (order alternating between rounds); after a
warm-up the median step time of each and their ratio are printed (goal: bridge ≤ 0.3 × package). The
package prints and writes ``state_lgs.txt`` every 100 steps: it runs in a temporary directory with its
output captured (the capture is part of its measured time, as in real use).

Run: ``python -m benchmarks.elra_step [--rounds 60] [--classes 10]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch


def make(seed, n_tensors=20, size=250_000):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(size, generator=g) * 0.1) for _ in range(n_tensors)]
    grads = [torch.randn(size, generator=g) * 0.01 for _ in range(n_tensors)]
    return params, grads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10, help="0: MATH mode, >= 2: DNN mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    if args.threads:
        torch.set_num_threads(args.threads)

    from elra import ElraOptimizer as Package

    from torch_bridge import ELRA

    kw = dict(classes=args.classes, batch_size=64, lr=1e-5)
    p_ours, g_ours = make(0)
    p_ref, g_ref = make(0)
    ours = ELRA(p_ours, **kw)
    tmp = tempfile.TemporaryDirectory(prefix="elra_bench_")
    old_cwd = os.getcwd()
    os.chdir(tmp.name)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ref = Package(p_ref, **kw)

        # the gradients stay in place (as after backward()); neither side copies them in the timed region
        for p, g in zip(p_ours, g_ours):
            p.grad = g.clone()
        for p, g in zip(p_ref, g_ref):
            p.grad = g.clone()

        def step_ours(i):
            ours.step(10.0 - 1e-3 * i)

        def step_ref(i):
            with contextlib.redirect_stdout(io.StringIO()):
                ref.step(10.0 - 1e-3 * i)

        t0 = time.perf_counter()
        step_ours(0)
        first = time.perf_counter() - t0
        step_ref(0)
        times = {"bridge": [], "package": []}
        fns = {"bridge": step_ours, "package": step_ref}
        for r in range(1, args.rounds + args.warmup + 1):
            order = ("bridge", "package") if r % 2 else ("package", "bridge")
            for name in order:
                t0 = time.perf_counter()
                fns[name](r)
                dt = time.perf_counter() - t0
                if r > args.warmup:
                    times[name].append(dt)
    finally:
        os.chdir(old_cwd)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(p_ours, p_ref))
    scale = max(float(b.detach().abs().max()) for b in p_ref)
    print(f"ELRA step, 5M params in 20 tensors, classes={args.classes}, {args.rounds} interleaved rounds "
          f"(load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()})")
    print(f"  first bridge step incl. compilation: {first:.2f} s")
    for k in ("bridge", "package"):
        q = np.percentile(times[k], [25, 75])
        print(f"  {k:<8} median {med[k] * 1e3:8.2f} ms   IQR {q[0] * 1e3:.2f}-{q[1] * 1e3:.2f} ms")
    print(f"  ratio bridge / package = {med['bridge'] / med['package']:.3f}   (goal <= 0.3)")
    print(f"  max |Δθ| bridge vs package after {args.rounds + args.warmup + 1} steps: {diff:.2e} "
          f"(relative {diff / scale:.1e})")


if __name__ == "__main__":
    main()
