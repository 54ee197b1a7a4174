"""Flax linen ``TrainState`` loop whose optimizer needs the loss: ``integrations.flax.apply_gradients``.

    python -m examples.linen_trainstate --steps 300

``TrainState.apply_gradients`` calls ``tx.update`` without extra arguments, so a transformation that needs the
loss (here ``optax.contrib.reduce_on_plateau`` after AdamW, which lowers the step when the loss stalls) would
raise ``TypeError: ... missing ... 'value'``. ``jaxopt_suite.integrations.flax.apply_gradients(state, grads,
value=loss)`` forwards it and otherwise does exactly what the method does.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import jaxopt_suite
from examples._digits import batch_indices, digits_split
from jaxopt_suite.integrations.flax import apply_gradients


class MLP(nn.Module):
    hidden: int = 64
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


def make_optimizer(learning_rate: float, patience: int) -> optax.GradientTransformationExtraArgs:
    """AdamW, then halve the step each time the (averaged) minibatch loss stops improving for a while."""
    return optax.chain(
        jaxopt_suite.adamw(learning_rate),
        optax.contrib.reduce_on_plateau(factor=0.5, patience=patience, accumulation_size=10, min_scale=1e-2),
    )


def loss_fn(params, apply_fn, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn({"params": params}, x), y).mean()


full_loss = jax.jit(loss_fn, static_argnums=1)


@jax.jit
def train_step(state: train_state.TrainState, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, x, y)
    state = apply_gradients(state, grads, value=loss)  # state.apply_gradients(grads=grads) would drop value
    return state, loss


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.linen_trainstate", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in digits_split(args.seed))
    model = MLP()
    params = model.init(jax.random.key(args.seed), x_train[:1])["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=make_optimizer(args.learning_rate, args.patience))

    initial_loss = float(full_loss(state.params, state.apply_fn, x_train, y_train))
    log_every = max(1, args.steps // 5)
    for step, idx in enumerate(batch_indices(len(x_train), args.steps, args.batch_size, args.seed + 1), 1):
        state, loss = train_step(state, x_train[idx], y_train[idx])
        if step % log_every == 0 or step == args.steps:
            plateau_scale = float(state.opt_state[1].scale)
            print(f"step {step:4d}  minibatch loss {float(loss):.4f}  plateau scale {plateau_scale:.3g}")

    logits = state.apply_fn({"params": state.params}, x_test)
    metrics = {
        "initial_train_loss": initial_loss,
        "final_train_loss": float(full_loss(state.params, state.apply_fn, x_train, y_train)),
        "test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y_test)),
        "plateau_scale": float(state.opt_state[1].scale),
        "step": int(state.step),
    }
    print(f"train loss {metrics['initial_train_loss']:.4f} → {metrics['final_train_loss']:.4f}, "
          f"test accuracy {metrics['test_accuracy']:.3f}, final plateau scale {metrics['plateau_scale']:.3g}")
    return metrics


if __name__ == "__main__":
    main()
