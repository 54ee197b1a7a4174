"""A learning-rate sweep as one program: ``vmap`` over whole training runs (``lax.scan`` over steps).

    python -m examples.hparam_sweep --steps 300 --learning-rates 1e-4,3e-4,1e-3,3e-3,1e-2

jaxopt-suite hyperparameters are array-like, so the optimizer can be built *inside* the traced function from a
traced learning rate. ``jax.vmap(train)(learning_rates)`` then trains one model per learning rate in parallel,
from the same initial weights and on the same minibatches, and compiles once whatever the number of rates.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxopt_suite
from examples._digits import batch_indices, digits_split


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def make_train(model, init_params, x_train, y_train, x_test, y_test, batches):
    """``train(learning_rate) -> (losses per step, test accuracy)``; pure, so it can be vmapped and jitted."""

    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

    def train(learning_rate):
        tx = jaxopt_suite.adamw(learning_rate)  # a traced learning rate: no recompilation per value

        def step(carry, idx):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x_train[idx], y_train[idx])
            updates, opt_state = tx.update(grads, opt_state, params, value=loss)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (init_params, tx.init(init_params)), batches)
        accuracy = jnp.mean(jnp.argmax(model.apply({"params": params}, x_test), -1) == y_test)
        return losses, loss_fn(params, x_train, y_train), accuracy

    return train


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.hparam_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rates", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in digits_split(args.seed))
    model = MLP()
    init_params = model.init(jax.random.key(args.seed), x_train[:1])["params"]
    batches = jnp.asarray(batch_indices(len(x_train), args.steps, args.batch_size, args.seed + 1))
    learning_rates = jnp.asarray([float(v) for v in args.learning_rates.split(",")], jnp.float32)

    train = make_train(model, init_params, x_train, y_train, x_test, y_test, batches)
    losses, final_losses, accuracies = jax.jit(jax.vmap(train))(learning_rates)

    print(f"{'learning rate':>13}  {'first loss':>10}  {'final train loss':>16}  {'test accuracy':>13}")
    for lr, curve, final, acc in zip(learning_rates, losses, final_losses, accuracies):
        print(f"{float(lr):13.1e}  {float(curve[0]):10.4f}  {float(final):16.4f}  {float(acc):13.3f}")
    best = int(jnp.argmin(final_losses))
    print(f"best learning rate by final train loss: {float(learning_rates[best]):.1e}")
    return {
        "learning_rates": [float(v) for v in learning_rates],
        "losses": jax.device_get(losses),
        "final_train_loss": [float(v) for v in final_losses],
        "test_accuracy": [float(v) for v in accuracies],
    }


if __name__ == "__main__":
    main()
