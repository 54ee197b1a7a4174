import jax
import jax.numpy as jnp
import optax

import jaxopt_suite as js

# A small least-squares problem: find w, b with x @ w + b = y.
x = jax.random.normal(jax.random.key(0), (256, 8))
y = x @ jnp.arange(8.0) + 1.0


def loss_fn(params):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def train(tx, steps):
    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        # The loss goes in as the keyword `value`; optimizers that do not use it ignore it.
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


# Any jaxopt-suite optimizer is an optax transformation: chain it like optax's own.
params, _ = train(optax.chain(optax.clip_by_global_norm(10.0), js.adamw(0.1, weight_decay=1e-4)), 500)
print(f"adamw: loss {float(loss_fn(params)):.2e}")

# Scheduled hyperparameters: inject_hyperparams traces them, so the schedule never recompiles.
schedule = optax.cosine_decay_schedule(0.1, decay_steps=500)
params, state = train(optax.inject_hyperparams(js.adamw)(learning_rate=schedule, weight_decay=1e-4), 500)
print(f"adamw + cosine: loss {float(loss_fn(params)):.2e}, "
      f"last learning rate {float(js.get_hyperparams(state)['learning_rate']):.2e}")

# A loss-driven optimizer needs `value`: ELRA adapts its own step size from the losses it is given.
params, _ = train(js.elra(1e-3), 300)
print(f"elra: loss {float(loss_fn(params)):.2e}")
