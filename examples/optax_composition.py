"""Composing a jaxopt-suite optimizer with optax: clipping, a cosine schedule, no decay on biases and norms.

    python -m examples.optax_composition --steps 300

The transformation is::

    chain(clip_by_global_norm(1.0),
          partition({"decay":    inject_hyperparams(jaxopt_suite.adamw)(learning_rate=cosine, weight_decay=λ),
                     "no_decay": inject_hyperparams(jaxopt_suite.adamw)(learning_rate=cosine, weight_decay=0.0)},
                    labels))

where ``labels`` sends biases and LayerNorm scales to ``"no_decay"`` (the analogue of torch param groups).
``inject_hyperparams`` keeps the hyperparameters in the state, so the learning rate used by the last update
is read back with ``jaxopt_suite.get_hyperparams(state)["learning_rate"]`` for logging.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxopt_suite
from examples._digits import batch_indices, digits_split

NO_DECAY_NAMES = ("bias", "scale")  # Dense biases and LayerNorm scales/biases are not decayed


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.LayerNorm()(nn.Dense(64)(x)))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def decay_labels(params):
    """``"no_decay"`` for leaves whose name is a bias or a norm scale, ``"decay"`` for weight matrices."""

    def label(path, _):
        return "no_decay" if path[-1].key in NO_DECAY_NAMES else "decay"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(peak_lr: float, steps: int, weight_decay: float, clip_norm: float = 1.0):
    schedule = optax.cosine_decay_schedule(init_value=peak_lr, decay_steps=steps, alpha=0.01)
    injected_adamw = optax.inject_hyperparams(jaxopt_suite.adamw)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.partition(
            {
                "decay": injected_adamw(learning_rate=schedule, weight_decay=weight_decay),
                "no_decay": injected_adamw(learning_rate=schedule, weight_decay=0.0),
            },
            decay_labels,
        ),
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.optax_composition", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in digits_split(args.seed))
    model = MLP()
    params = model.init(jax.random.key(args.seed), x_train[:1])["params"]
    tx = make_optimizer(args.learning_rate, args.steps, args.weight_decay)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    labels = decay_labels(params)
    print("not decayed:", sorted("/".join(k.key for k in path) for path, label in
                                 jax.tree_util.tree_leaves_with_path(labels) if label == "no_decay"))
    initial_loss = float(loss_fn(params, x_train, y_train))
    learning_rates = []
    log_every = max(1, args.steps // 5)
    for step, idx in enumerate(batch_indices(len(x_train), args.steps, args.batch_size, args.seed + 1), 1):
        params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
        lr = float(jaxopt_suite.get_hyperparams(opt_state)["learning_rate"])  # the lr this step used
        learning_rates.append(lr)
        if step % log_every == 0 or step == args.steps:
            print(f"step {step:4d}  minibatch loss {float(loss):.4f}  lr {lr:.2e}")

    accuracy = jnp.mean(jnp.argmax(model.apply({"params": params}, x_test), -1) == y_test)
    metrics = {
        "initial_train_loss": initial_loss,
        "final_train_loss": float(loss_fn(params, x_train, y_train)),
        "test_accuracy": float(accuracy),
        "learning_rates": learning_rates,
    }
    print(f"train loss {metrics['initial_train_loss']:.4f} → {metrics['final_train_loss']:.4f}, "
          f"test accuracy {metrics['test_accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
