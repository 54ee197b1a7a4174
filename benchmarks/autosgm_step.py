"""AutoSGM step time in its heaviest configuration vs the suite's Adam, on the same 5M-parameter model.

The model is 20 float32 tensors of 500 × 500 (5,000,000 parameters). Both optimizers run as one jitted
``update + apply_updates`` with donated buffers; the two steps are interleaved in one loop and the
medians after warm-up are compared (the printed ratio is the result; absolute times depend on the machine).

Heaviest AutoSGM configuration: Huberised-parcor numerator (num_lrc=2: five state tensors per parameter),
filter zero γ ≠ 0, debiasing, decoupled weight decay and a raised-cosine window. The Adam-like and
heavy-ball configurations are printed for context. Where the heaviest configuration's extra time goes
(XLA:CPU, whose loop fusions each write one array): per tensor it runs eight full-size passes, one per
state it writes (w², moment, |w·v|, numerator, smoothing state), one that stores the normalised step v,
the per-tensor mean of the clipped numerator (it must finish before the step can be formed) and the
parameter update; about 29 array reads and writes against Adam's 10.

    python -m benchmarks.autosgm_step [--steps 60] [--warmup 10] [--tensors 20] [--size 500]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxopt_suite
from jaxopt_suite.autosgm import autosgm, autosgm_window


def heaviest_autosgm():
    return autosgm(1e-2, beta_i=0.9, gamma_i=0.5528, weight_decay=1e-2, wd_level=1, num_lrc=2,
                   window=autosgm_window(1, n=2, tau=1, spe=10_000))


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None) -> dict[str, float]:
    """Print the medians and ratios; return each variant's median step time divided by Adam's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--size", type=int, default=500)
    args = parser.parse_args(argv)

    key = jax.random.PRNGKey(0)
    shapes = [(args.size, args.size)] * args.tensors
    params0 = {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), s) * 0.05 for i, s in enumerate(shapes)}
    grads = {k: jax.random.normal(jax.random.fold_in(key, 1000 + i), v.shape) * 1e-2
             for i, (k, v) in enumerate(params0.items())}
    count = sum(int(np.prod(s)) for s in shapes)

    runs = {
        "adam": jaxopt_suite.adam(1e-3),
        "autosgm(num_lrc=2, window, wd)": heaviest_autosgm(),
        "autosgm Adam-like (num_lrc=0)": autosgm(1e-3, beta_i=0.9, eps=1e-8),
        "autosgm heavy ball": autosgm(1e-2, aoptlr=False, beta_i=0.9, eta_i=1.0, debias=False),
    }
    steps = {name: make_step(tx) for name, tx in runs.items()}
    carry = {name: (jax.tree.map(jnp.copy, params0), tx.init(params0)) for name, tx in runs.items()}
    times = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name in runs:  # interleaved: both see the same machine load
            params, state = carry[name]
            start = time.perf_counter()
            params, state = steps[name](params, state, grads)
            jax.block_until_ready(params)
            elapsed = time.perf_counter() - start
            carry[name] = (params, state)
            if i >= args.warmup:
                times[name].append(elapsed)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {args.tensors} tensors, "
          f"{count:,} parameters; median of {args.steps} interleaved steps after {args.warmup} warm-up")
    for name, med in medians.items():
        print(f"  {name:34s} {1e3 * med:9.3f} ms   {med / medians['adam']:5.2f}x adam")
    ratio = medians["autosgm(num_lrc=2, window, wd)"] / medians["adam"]
    print(f"ratio heaviest autosgm / adam: {ratio:.2f}x (goal <= 1.5x)")
    return {name: med / medians["adam"] for name, med in medians.items()}


if __name__ == "__main__":
    main()
