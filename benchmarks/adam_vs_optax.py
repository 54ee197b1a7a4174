"""Suite Adam (``jaxopt_suite.adam``) against ``optax.adam`` on two parameter layouts, pure JAX.

    python -m benchmarks.adam_vs_optax                    # both models, 5 warm-up + 40 interleaved rounds
    python -m benchmarks.adam_vs_optax --rounds 20 --model many_small

Models (float32):

* ``large``: ~10M parameters in 100 tensors, shaped like a small transformer (d = 320);
* ``many_small``: ~1M parameters in 400 tensors (200 matrices of 32–80 × 48–112, 200 vectors of 100–700).

Each variant is one jitted step ``params, state ← params + tx.update(grads, state, params)`` with params and
state donated, on fixed random gradients. Variants run interleaved in one process (see ``_timing.py``); the
printed ratio is the median step time over ``optax.adam(eps_root=0)``'s. The target is ≤ 1.05×.

After timing, both optimizers are run for a few steps from the same start and the largest parameter
difference is printed: the suite's bias corrections are more accurate in float32 than optax's
(``torch_semantics.md`` §1), so the two differ by rounding only (~1e-7 relative).
"""

from __future__ import annotations

import argparse
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxopt_suite
from benchmarks._timing import interleaved_median, machine_line, ratio_table


def large_model_shapes(d: int = 320, blocks: int = 8, vocab: int = 1000) -> list[tuple[int, ...]]:
    """100 tensors, ~10M parameters: embedding, ``blocks`` × (attention + MLP + 2 norms), head."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (256, d)]  # token and position embeddings
    for _ in range(blocks):
        shapes += [(d, 3 * d), (3 * d,), (d, d), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
        shapes += [(d,), (d,), (d,), (d,)]  # two layer norms: scale, bias
    shapes += [(d,), (d,)]  # final norm
    return shapes


def many_small_shapes(seed: int = 0) -> list[tuple[int, ...]]:
    """400 tensors, ~1M parameters: 200 matrices of 32–80 × 48–112 and 200 vectors of 100–700."""
    rng = np.random.default_rng(seed)
    matrices = [(int(rng.integers(32, 81)), int(rng.integers(48, 113))) for _ in range(200)]
    vectors = [(int(rng.integers(100, 701)),) for _ in range(200)]
    return [s for pair in zip(matrices, vectors) for s in pair]


MODELS: dict[str, Callable[[], list[tuple[int, ...]]]] = {"large": large_model_shapes, "many_small": many_small_shapes}


def random_tree(shapes, seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {f"p{i:03d}": jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for i, s in enumerate(shapes)}


class Stepper:
    """One optimizer's jitted, donating step on its own copy of the params."""

    def __init__(self, tx: optax.GradientTransformation):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.init = jax.jit(tx.init)
        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.params = self.state = self.grads = None

    def reset(self, params, grads) -> "Stepper":
        self.grads = grads
        self.params = jax.tree.map(jnp.array, params)  # private copy: donated every step
        self.state = self.init(self.params)
        return self

    def __call__(self):
        self.params, self.state = self.step(self.params, self.state, self.grads)
        return self.params


def variants() -> dict[str, Stepper]:
    return {
        "optax.adam": Stepper(optax.adam(1e-3, eps_root=0.0)),
        "jaxopt_suite.adam": Stepper(jaxopt_suite.adam(1e-3)),
    }


def max_param_difference(steppers: dict[str, Stepper], params, grads, steps: int = 10) -> float:
    """Largest |θ_a − θ_b| after ``steps`` steps of the first two steppers from the same start."""
    a, b = (s.reset(params, grads) for s in list(steppers.values())[:2])
    for _ in range(steps):
        a(), b()
    diffs = jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a.params, b.params)
    return float(max(jax.tree.leaves(diffs)))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adam_vs_optax", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)

    print(machine_line())
    print(f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()}")
    ratios = {}
    for model in MODELS if args.model == "all" else [args.model]:
        shapes = MODELS[model]()
        params = random_tree(shapes, seed=1)
        grads = random_tree(shapes, seed=2, scale=1e-2)
        count = sum(int(np.prod(s)) for s in shapes)
        print(f"\n== {model}: {count / 1e6:.2f}M parameters in {len(shapes)} tensors", flush=True)
        steppers = {name: s.reset(params, grads) for name, s in variants().items()}
        timings = interleaved_median(steppers, warmup=args.warmup, rounds=args.rounds)
        print(ratio_table(timings, baseline="optax.adam"), flush=True)
        ratios[model] = timings["jaxopt_suite.adam"].median / timings["optax.adam"].median
        print(f"max |θ_suite − θ_optax| after 10 steps: {max_param_difference(steppers, params, grads):.2e}",
              flush=True)
    print("\nsuite / optax median step time: " + ", ".join(f"{m} {r:.3f}×" for m, r in ratios.items())
          + " (target ≤ 1.05×)")
    return ratios


if __name__ == "__main__":
    main()
