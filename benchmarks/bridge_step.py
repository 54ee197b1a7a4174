"""Adam step time through the torch bridge vs torch.optim.Adam(fused=True), in one interleaved run.

For each model ((i) ~10M params in 100 tensors, (ii) ~1M params in 400 tensors) the variants below step
the same parameters with the same fixed gradients, interleaved (forward then reverse order per round)
after a warm-up; the median and IQR of the step time are printed with the ratio to fused Adam measured
in the same run, and max |Δθ| to fused at the end:

* torch Adam fused / foreach;
* pure suite Adam on one flat JAX array (donated), i.e. the JAX lower bound without any bridge;
* bridge Adam (``torch_bridge.Adam``, flat path), with the default scratch + ``copy_`` write-back and with
  ``write_back="swap"`` (double buffer, no copy);
* a memory-traffic reference: three in-place torch adds over θ, m, v (36 B/param, one pass each).

Also printed: first step including compilation (fresh process, 400 tensors), compiles over 1000
scheduled steps (OneCycleLR moving lr and betas, then ReduceLROnPlateau, tensor lr), and the bridge's
memory beyond params, grads and optimizer state. Timings are noisy on a loaded machine: read ratios,
not absolute numbers; the load average is printed.

The loop users run (``zero_grad()``, forward and backward of a real model, ``step()``, for every torch-named
bridge class) is timed by :mod:`benchmarks.bridge_loop`.

Run: ``python -m benchmarks.bridge_step [--rounds 40] [--small]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxopt_suite
import torch_bridge


def model_10m():
    """~10M params in 100 tensors (d = 320 transformer-like blocks)."""
    shapes = []
    d = 320
    while len(shapes) < 100:
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    shapes = shapes[:98] + [(4096, d), (d,)]
    return shapes


def model_1m():
    """~1M params in 400 tensors (200 matrices of 32-80 x 48-112 and 200 vectors of 100-700)."""
    rng = np.random.default_rng(0)
    shapes = []
    for _ in range(200):
        shapes.append((int(rng.integers(32, 81)), int(rng.integers(48, 113))))
        shapes.append((int(rng.integers(100, 701)),))
    return shapes


def make_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]
    grads = [torch.randn(s, generator=g) * 0.01 for s in shapes]
    return params, grads


def clone_params(params, grads):
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    return ps


class PureJaxFlat:
    """Suite Adam on one flat JAX array with donation: the bridge's lower bound."""

    def __init__(self, params, grads, lr):
        self.p = jnp.concatenate([jnp.asarray(p.detach().numpy()).ravel() for p in params])
        self.g = jnp.concatenate([jnp.asarray(g.numpy()).ravel() for g in grads])
        tx = jaxopt_suite.adam(lr)
        self.state = tx.init(self.p)

        def step(p, g, s):
            u, s = tx.update(g, s, p)
            return p + u, s

        self.step_fn = jax.jit(step, donate_argnums=(0, 2))
        self.sizes = [p.numel() for p in params]

    def step(self):
        self.p, self.state = self.step_fn(self.p, self.g, self.state)
        self.p.block_until_ready()

    def params(self):
        return np.split(np.asarray(self.p), np.cumsum(self.sizes)[:-1])


class Floor:
    """Three in-place adds over θ, m, v: a memory-traffic reference (36 B/param in three passes)."""

    def __init__(self, params, grads):
        n = sum(p.numel() for p in params)
        self.t, self.m, self.v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        self.g = torch.randn(n)

    def step(self):
        self.m.add_(self.g)
        self.v.add_(self.g)
        self.t.add_(self.m)


def time_call(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_model(label, shapes, rounds, warmup=5, lr=1e-3):
    params, grads = make_params(shapes)
    n = sum(p.numel() for p in params)
    variants = {}
    fused_p = clone_params(params, grads)
    variants["torch Adam fused"] = (torch.optim.Adam(fused_p, lr=lr, fused=True).step, fused_p)
    foreach_p = clone_params(params, grads)
    variants["torch Adam foreach"] = (torch.optim.Adam(foreach_p, lr=lr, foreach=True).step, foreach_p)
    pure = PureJaxFlat(params, grads, lr)
    variants["suite Adam, pure JAX flat"] = (pure.step, pure)
    bridge_p = clone_params(params, grads)
    bridge = torch_bridge.Adam(bridge_p, lr=lr)
    variants["bridge Adam"] = (bridge.step, bridge_p)
    swap_p = clone_params(params, grads)
    swap = torch_bridge.Adam(swap_p, lr=lr, write_back="swap")
    variants["bridge Adam, write_back=swap"] = (swap.step, swap_p)
    floor = Floor(params, grads)
    variants["floor: 3 in-place adds (36 B/param)"] = (floor.step, None)
    names = list(variants)
    times = {k: [] for k in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            dt = time_call(variants[k][0])
            if r >= warmup:
                times[k].append(dt)
    ref = [p.detach() for p in fused_p]

    def diff(k):
        obj = variants[k][1]
        if obj is None:
            return float("nan")
        if isinstance(obj, PureJaxFlat):
            got = [torch.from_numpy(np.array(a)).view(p.shape) for a, p in zip(obj.params(), ref)]
        else:
            got = [p.detach() for p in obj]
        return max((a - b).abs().max().item() for a, b in zip(got, ref))

    fused_med = statistics.median(times["torch Adam fused"])
    print(f"\n{label}: {n / 1e6:.2f}M params in {len(shapes)} tensors, {rounds} rounds after {warmup} warm-up "
          f"({warmup + rounds} steps each)")
    print(f"{'variant':32s} {'median ms':>10s} {'IQR ms':>14s} {'x fused':>8s} {'max|dθ| vs fused':>18s}")
    for k in names:
        q = np.percentile(times[k], [25, 75])
        med = statistics.median(times[k])
        print(f"{k:32s} {med:10.2f} {q[0]:6.2f}-{q[1]:6.2f} {med / fused_med:8.2f} {diff(k):18.2e}")
    buf_bytes = bridge.bridge_nbytes()
    pbytes = sum(p.numel() * p.element_size() for p in bridge_p)
    state_bytes = sum(int(x.nbytes) for rt in bridge._runtime for b in rt.buffers for x in jax.tree.leaves(b.state))
    flat_pg = sum(b.flat_p.nbytes + b.flat_g.nbytes for rt in bridge._runtime for b in rt.buffers)
    extra = buf_bytes - state_bytes - flat_pg
    pad = flat_pg / 2 - pbytes
    print(f"bridge memory beyond params, grads and state: {extra / 2**20:.1f} MiB = {extra / pbytes:.2f} param "
          f"copies (scratch); padding {pad / len(shapes):.0f} B/tensor")
    return times


def first_step_time(shapes):
    """Construction and first step (compile included) in a process where torch and JAX are initialised."""
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # one-time torch imports (dynamo) happen here
    jnp.zeros(1).block_until_ready()  # JAX backend start
    params, grads = make_params(shapes, seed=1)
    ps = clone_params(params, grads)
    t0 = time.perf_counter()
    opt = torch_bridge.Adam(ps, lr=1e-3)
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def recompiles_over(steps=1000):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    opt = torch_bridge.Adam(model.parameters(), lr=torch.tensor(1e-3), betas=(0.9, 0.99))
    onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps // 2 + 1,
                                                   cycle_momentum=True)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2)

    def one():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        return loss

    one()
    before = torch_bridge.compiled_step_cache_size()
    for i in range(steps - 1):
        loss = one()
        if i < steps // 2:
            onecycle.step()
        else:
            plateau.step(float(loss.detach()))
    return torch_bridge.compiled_step_cache_size() - before


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--small", action="store_true", help="only the 1M/400 model (quick check)")
    ap.add_argument("--recompile-steps", type=int, default=1000)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads (default: all cores, like XLA's CPU thread pool)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__}, jax {jax.__version__}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    construct, first = first_step_time(model_1m())
    print(f"400 tensors: construction {construct:.0f} ms, first step incl. compile {first:.0f} ms "
          f"(goal <= 1000 ms)")
    print(f"compiled-step cache growth over {args.recompile_steps} steps with OneCycleLR(lr, betas), tensor lr "
          f"and ReduceLROnPlateau: {recompiles_over(args.recompile_steps)} (goal 0)")
    bench_model("(ii) ~1M/400", model_1m(), args.rounds)
    if not args.small:
        bench_model("(i) ~10M/100", model_10m(), args.rounds)
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
