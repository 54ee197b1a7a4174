import jax
import optax
from flax import nnx

import jaxopt_suite as js


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(16, 64, rngs=rngs)
        self.out = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


# Synthetic 4-class data: the label is the index of the largest of the first four features.
x = jax.random.normal(jax.random.key(0), (512, 16))
y = x[:, :4].argmax(axis=1)

model = MLP(nnx.Rngs(0))
# Lookahead over AdamW; any jaxopt-suite transformation goes into nnx.Optimizer unchanged.
tx = js.lookahead(js.adamw(3e-3, weight_decay=1e-2), sync_period=5, slow_step_size=0.5)
opt = nnx.Optimizer(model, tx, wrt=nnx.Param)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads, value=loss)  # extra keywords reach tx.update
    return loss


first = float(loss_fn(model, x, y))
for i in range(300):
    batch = slice((i * 64) % 512, (i * 64) % 512 + 64)
    loss = train_step(model, opt, x[batch], y[batch])
last = float(loss_fn(model, x, y))
print(f"train loss {first:.3f} -> {last:.3f}")
assert last < 0.5 * first
