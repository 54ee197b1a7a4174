"""Time to the first step, compilation included, for every registry entry: pure JAX and through the bridge.

Each measurement runs in a fresh Python process (so nothing is compiled yet) and times, after the imports
and the construction of the parameters:

* ``jax``: ``jax.jit(tx.init)`` and one ``jax.jit(tx.update)`` call (plus ``optax.apply_updates``), to
  completion, on a params dict of ``L`` leaves of 100-5000 float32 elements;
* ``bridge``: ``torch_bridge.JaxOptimizer(params, name)`` (the registry entry's defaults) and its first
  ``step()`` on ``L`` torch tensors of the same sizes with gradients set.

Then each measurement is repeated in another fresh process sharing a JAX persistent compilation cache
directory with the first (``jax.config.update("jax_compilation_cache_dir", ...)``, minimum compile time
and entry size 0), which is the warm start a user gets by enabling the cache (docs: "Compile time").
A measurement that does not finish within ``--timeout`` seconds is reported as ``>T``.

Run: ``python -m benchmarks.first_step [--leaves 10,400] [--entries adam,sgd] [--timeout 120] [--no-cache]``.
The goals of the compile-time issue are <= 0.3 s on 10 leaves and <= 1 s on 400 leaves, cold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaf_sizes(n_leaves: int) -> list[int]:
    """Deterministic sizes in [100, 5000] (a mix of small vectors and larger matrices, flattened)."""
    import numpy as np

    return [int(s) for s in np.random.default_rng(0).integers(100, 5001, size=n_leaves)]


def _enable_cache(cache_dir: str) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def child(backend: str, name: str, n_leaves: int, cache_dir: str | None) -> dict:
    """One measurement (runs in the child process); returns seconds to the first step and for a second."""
    if cache_dir:
        _enable_cache(cache_dir)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxopt_suite import registry

    entry = registry.get(name)
    sizes = leaf_sizes(n_leaves)
    rng = np.random.default_rng(1)
    values = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in sizes]
    grads_np = [rng.standard_normal(s).astype(np.float32) * 0.01 for s in sizes]
    extra = {"value": 1.0} if entry.requires_value else {}

    if backend == "jax":
        params = {f"p{i:04d}": jnp.asarray(v) for i, v in enumerate(values)}
        grads = {f"p{i:04d}": jnp.asarray(g) for i, g in enumerate(grads_np)}
        tx = entry.build()

        @jax.jit
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params, **{k: jnp.float32(v) for k, v in extra.items()})
            return optax.apply_updates(params, updates), state

        t0 = time.perf_counter()
        state = jax.jit(tx.init)(params)
        params2, state = jax.block_until_ready(step(params, state, grads))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(step(params2, state, grads))
        second = time.perf_counter() - t0
    else:
        import torch

        import torch_bridge

        params = [torch.nn.Parameter(torch.from_numpy(v)) for v in values]
        for p, g in zip(params, grads_np):
            p.grad = torch.from_numpy(g)
        t0 = time.perf_counter()
        opt = torch_bridge.JaxOptimizer(params, name)
        opt.step(**extra)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt.step(**extra)
        second = time.perf_counter() - t0
    return {"first_s": first, "second_s": second}


def run_child(backend, name, n_leaves, cache_dir, timeout):
    cmd = [sys.executable, "-m", "benchmarks.first_step", "--child", backend, name, str(n_leaves)]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} {name} {n_leaves}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, metavar=("BACKEND", "ENTRY", "LEAVES"), help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--leaves", default="10,400", help="comma-separated leaf counts (default 10,400)")
    ap.add_argument("--entries", default="", help="comma-separated registry names (default: all)")
    ap.add_argument("--backends", default="jax,bridge")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement (default 120)")
    ap.add_argument("--no-cache", action="store_true", help="skip the warm (persistent cache) repeat")
    args = ap.parse_args(argv)

    if args.child:
        backend, name, n = args.child
        print(json.dumps(child(backend, name, int(n), args.cache_dir)))
        return

    from benchmarks._timing import machine_line
    from jaxopt_suite import registry

    names = [n for n in args.entries.split(",") if n] or registry.names()
    leaves = [int(n) for n in args.leaves.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    fmt = lambda r, key: f">{args.timeout:.0f}" if r is None else f"{r[key]:.2f}"  # noqa: E731
    print(machine_line())
    print(f"{'entry':<16} {'backend':<7} {'leaves':>6} {'cold s':>8} {'warm s':>8} {'2nd step ms':>12}")
    for name in names:
        for backend in backends:
            for n in leaves:
                with tempfile.TemporaryDirectory(prefix="first_step_cache_") as cache:
                    cold = run_child(backend, name, n, None if args.no_cache else cache, args.timeout)
                    warm = None
                    if not args.no_cache and cold is not None:
                        warm = run_child(backend, name, n, cache, args.timeout)
                second = "-" if cold is None else f"{cold['second_s'] * 1e3:.2f}"
                print(f"{name:<16} {backend:<7} {n:>6} {fmt(cold, 'first_s'):>8} "
                      f"{'-' if args.no_cache else fmt(warm, 'first_s'):>8} {second:>12}", flush=True)


if __name__ == "__main__":
    main()
