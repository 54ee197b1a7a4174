import flax.linen as nn
import jax
import optax
from flax.training import train_state

import jaxopt_suite as js
from jaxopt_suite.integrations.flax import apply_gradients


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(64)(x)))


x = jax.random.normal(jax.random.key(0), (512, 16))
y = x[:, :4].argmax(axis=1)

model = MLP()
params = model.init(jax.random.key(1), x[:1])["params"]
# AdamW, then halve the step whenever the averaged loss stops improving: reduce_on_plateau needs the loss.
tx = optax.chain(js.adamw(3e-3),
                 optax.contrib.reduce_on_plateau(factor=0.5, patience=3, accumulation_size=10))
state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()


@jax.jit
def train_step(state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
    # state.apply_gradients(grads=grads) would not pass `value` to tx.update; this does.
    return apply_gradients(state, grads, value=loss), loss


first = float(loss_fn(state.params, x, y))
for i in range(300):
    batch = slice((i * 64) % 512, (i * 64) % 512 + 64)
    state, loss = train_step(state, x[batch], y[batch])
last = float(loss_fn(state.params, x, y))
print(f"train loss {first:.3f} -> {last:.3f} after {int(state.step)} steps")
assert last < 0.5 * first
