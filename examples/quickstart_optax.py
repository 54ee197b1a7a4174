"""Quickstart with only the core dependencies (jax, optax, numpy): no Flax, no torch, no data sets.

A least-squares regression ``min_w ||X w + b − y||² / n`` on synthetic data, trained with three suite
optimizers inside ordinary optax code: ``jaxopt_suite.adamw`` alone, ``jaxopt_suite.adam`` with an optax
cosine schedule behind ``optax.clip_by_global_norm`` in an ``optax.chain``, and Lookahead over SGD with
momentum. Each run is one jitted step function; the loss is passed as ``value``
(ignored by optimizers that do not use it).

Run: ``python examples/quickstart_optax.py [--steps 200]`` (it works from an installed wheel: the file
imports nothing from the repository). Exits non-zero if a run fails to reduce the loss tenfold.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxopt_suite as js


def make_problem(seed: int = 0, n: int = 256, d: int = 16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w_true = rng.normal(size=(d,)).astype(np.float32)
    y = x @ w_true + 0.5 + 0.01 * rng.normal(size=(n,)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def loss_fn(params, x, y):
    residual = x @ params["w"] + params["b"] - y
    return jnp.mean(residual ** 2)


def train(tx: optax.GradientTransformation, steps: int, x, y) -> tuple[float, float]:
    params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    first = float(loss_fn(params, x, y))
    for _ in range(steps):
        params, state, _ = step(params, state)
    return first, float(loss_fn(params, x, y))


def optimizers(steps: int) -> dict[str, optax.GradientTransformation]:
    schedule = optax.cosine_decay_schedule(init_value=5e-2, decay_steps=steps)
    return {
        "adamw(5e-2)": js.adamw(5e-2, weight_decay=0.0),
        "clip -> adam(cosine schedule)": optax.chain(optax.clip_by_global_norm(10.0), js.adam(schedule)),
        "lookahead(sgd momentum)": js.lookahead_sgd(learning_rate=2e-2, momentum=0.9, sync_period=5,
                                                    slow_step_size=0.5),
    }


def main(argv=None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    x, y = make_problem()
    results = {}
    for name, tx in optimizers(args.steps).items():
        first, last = train(tx, args.steps, x, y)
        results[name] = (first, last)
        print(f"{name:32s} loss {first:9.4f} -> {last:.6f}")
    return results


if __name__ == "__main__":
    out = main()
    failed = [name for name, (first, last) in out.items() if not last < first / 10]
    if failed:
        print(f"did not reduce the loss tenfold: {failed}", file=sys.stderr)
        sys.exit(1)
