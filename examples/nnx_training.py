"""Flax NNX training loop with a jaxopt-suite optimizer: Lookahead over AdamW, the loss passed as ``value``.

    python -m examples.nnx_training --steps 300

What it shows:

* ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` takes any jaxopt-suite transformation; ``opt.update(model, grads,
  value=loss)`` forwards ``value`` (and any other keyword) to ``tx.update``. Optimizers that do not use the
  loss ignore it, so the same loop serves loss-driven optimizers unchanged.
* Lookahead keeps its slow weights in the optimizer state, so it wraps AdamW as a drop-in: no special params
  type, unlike ``optax.lookahead``.
* A checkpoint as plain arrays: ``nnx.to_pure_dict(nnx.state(opt))`` and back with ``nnx.replace_by_pure_dict``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxopt_suite
from examples._digits import batch_indices, digits_split


class MLP(nnx.Module):
    """64 → hidden → hidden → 10 with LayerNorm and ReLU."""

    def __init__(self, features: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(features, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.mid = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.inp(x)))
        x = nnx.relu(self.mid(x))
        return self.out(x)


def make_optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformationExtraArgs:
    """Lookahead (k = 5, α = 0.5) over AdamW: every 5th step the weights move half-way back to the slow copy."""
    inner = jaxopt_suite.adamw(learning_rate, weight_decay=weight_decay)
    return jaxopt_suite.lookahead(inner, sync_period=5, slow_step_size=0.5)


def loss_fn(model: MLP, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: MLP, opt: nnx.Optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads, value=loss)  # value reaches tx.update (Lookahead forwards it to AdamW)
    return loss


full_loss = nnx.jit(loss_fn)


@nnx.jit
def accuracy(model: MLP, x, y):
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.nnx_training", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in digits_split(args.seed))
    model = MLP(x_train.shape[1], 64, 10, rngs=nnx.Rngs(args.seed))
    opt = nnx.Optimizer(model, make_optimizer(args.learning_rate, args.weight_decay), wrt=nnx.Param)

    initial_loss = float(full_loss(model, x_train, y_train))
    batches = batch_indices(len(x_train), args.steps, args.batch_size, args.seed + 1)
    log_every = max(1, args.steps // 5)
    for step, idx in enumerate(batches, start=1):
        loss = train_step(model, opt, x_train[idx], y_train[idx])
        if step % log_every == 0 or step == args.steps:
            print(f"step {step:4d}  minibatch loss {float(loss):.4f}")

    # Checkpoint as plain arrays and restore into a freshly built optimizer.
    checkpoint = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(opt)))
    restored = nnx.Optimizer(MLP(x_train.shape[1], 64, 10, rngs=nnx.Rngs(args.seed + 99)),
                             make_optimizer(args.learning_rate, args.weight_decay), wrt=nnx.Param)
    restored_state = nnx.state(restored)
    nnx.replace_by_pure_dict(restored_state, checkpoint)
    nnx.update(restored, restored_state)
    same_opt_state = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(checkpoint), jax.tree.leaves(nnx.to_pure_dict(nnx.state(restored))))
    )

    metrics = {
        "initial_train_loss": initial_loss,
        "final_train_loss": float(full_loss(model, x_train, y_train)),
        "test_accuracy": float(accuracy(model, x_test, y_test)),
        "checkpoint_round_trip": same_opt_state,
    }
    print(f"train loss {metrics['initial_train_loss']:.4f} → {metrics['final_train_loss']:.4f}, "
          f"test accuracy {metrics['test_accuracy']:.3f}, optimizer checkpoint restored: {same_opt_state}")
    return metrics


if __name__ == "__main__":
    main()
