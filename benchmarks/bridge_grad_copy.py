"""Cost of torch gradient semantics in the bridge: one training iteration and its ``opt.step()``, in ms.

Compares, in one interleaved run (variants alternate forward / reverse order each round, after a warm-up;
median and IQR), ``torch.optim.Adam`` (default implementation), the bridge's ``Adam`` of this checkout and,
with ``--before DIR``, the ``torch_bridge`` package found in ``DIR`` (e.g. another checkout's
``torch_bridge/``; it is imported under another name, so both run in the same process). Each is timed
with the default loop (``zero_grad()`` = set_to_none, so torch allocates fresh ``.grad`` tensors that the
bridge copies into its flat buffer once per step) and with ``zero_grad(set_to_none=False)`` (backward
accumulates into the flat buffer's views: no copy). Models: the digits-size MLP of the tests (64-32-10, 4
tensors, batch 256) and a ~1M-parameter MLP with 6 tensors (1024-512-512-512, batch 64). torch runs with
one intra-op thread (``--torch-threads``). Read ratios, not absolute numbers, on a loaded machine.

Run: ``python -m benchmarks.bridge_grad_copy [--before ../main/torch_bridge] [--rounds 60]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import torch_bridge


def load_before(path: str):
    """Import the torch_bridge package at ``path`` as ``torch_bridge_before``."""
    tmp = tempfile.mkdtemp(prefix="bridge_before_")
    shutil.copytree(path, os.path.join(tmp, "torch_bridge_before"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, tmp)
    return importlib.import_module("torch_bridge_before")


def digits_model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)), 256, 64


def mlp_1m():
    return (torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 512)), 64, 1024)


def bench(label, make, bridges, rounds, warmup=10):
    torch.manual_seed(0)
    _, batch, d_in = make()
    x = torch.randn(batch, d_in)
    variants = {}
    for opt_name, ctor in [("torch Adam", lambda ps: torch.optim.Adam(ps, lr=1e-3))] + [
            (f"bridge Adam ({tag})", (lambda mod: lambda ps: mod.Adam(ps, lr=1e-3))(mod)) for tag, mod in bridges]:
        for set_to_none in (True, False):
            torch.manual_seed(0)
            model, _, _ = make()
            opt = ctor(model.parameters())
            variants[f"{opt_name}, zero_grad(set_to_none={set_to_none})"] = (model, opt, set_to_none)
    names = list(variants)
    it_times = {k: [] for k in names}
    step_times = {k: [] for k in names}
    for r in range(warmup + rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            model, opt, set_to_none = variants[k]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=set_to_none)
            (model(x) ** 2).mean().backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if r >= warmup:
                it_times[k].append((t2 - t0) * 1e3)
                step_times[k].append((t2 - t1) * 1e3)
    n = sum(p.numel() for p in variants[names[0]][0].parameters())
    print(f"\n{label}: {n / 1e6:.3f}M params in {len(list(variants[names[0]][0].parameters()))} tensors, batch "
          f"{batch}, {rounds} rounds after {warmup} warm-up")
    print(f"{'variant':52s} {'iteration ms (IQR)':>24s} {'step() ms (IQR)':>22s}")
    for k in names:
        qi, qs = np.percentile(it_times[k], [25, 75]), np.percentile(step_times[k], [25, 75])
        print(f"{k:52s} {statistics.median(it_times[k]):8.3f} ({qi[0]:.3f}-{qi[1]:.3f}) "
              f"{statistics.median(step_times[k]):8.3f} ({qs[0]:.3f}-{qs[1]:.3f})")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="directory of another torch_bridge package to compare against")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    bridges = [("this checkout", torch_bridge)]
    if args.before:
        bridges.insert(0, ("before", load_before(args.before)))
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    bench("digits-size MLP 64-32-10", digits_model, bridges, args.rounds)
    bench("~1M-param MLP 1024-512-512-512", mlp_1m, bridges, args.rounds)
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
