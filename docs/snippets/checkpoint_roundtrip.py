"""Train in PyTorch, continue in Flax NNX with the same optimizer state, and go back.

Run by scripts/docs.sh on every build of the site; the asserts are the claims the page makes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import torch_bridge
from torch_bridge import checkpoint

torch.manual_seed(0)
x = torch.randn(64, 8)
y = torch.randn(64, 1)

# 1. Ten steps in PyTorch through the bridge.
model_t = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt_t = torch_bridge.AdamW(model_t.parameters(), lr=1e-2)
for _ in range(10):
    opt_t.zero_grad()
    torch.nn.functional.mse_loss(model_t(x), y).backward()
    opt_t.step()


# 2. The same network in Flax NNX (the default mapping pairs torch module order with Flax paths and transposes
#    Linear weights), with the bridge's optimizer state converted to the optax state of jaxopt_suite.adamw.
class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


model_j = MLP(nnx.Rngs(0))
params = checkpoint.flax_params(model_t, nnx.state(model_j, nnx.Param))
nnx.update(model_j, params)
tx, opt_state = checkpoint.to_optax(opt_t, params)     # tx: js.adamw with the checkpoint's hyperparameters

xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
graphdef = nnx.graphdef(model_j)


def loss_fn(p):
    return jnp.mean((nnx.merge(graphdef, p)(xj) - yj) ** 2)


# 3. Five more steps in JAX, and the same five in PyTorch from the same point: the trajectories agree to
#    float32 rounding (the two frameworks' gradients round differently).
for _ in range(5):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    params = optax.apply_updates(params, updates)
for _ in range(5):
    opt_t.zero_grad()
    torch.nn.functional.mse_loss(model_t(x), y).backward()
    opt_t.step()
ours = checkpoint.flax_params(model_t, params)
gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(params)))
print(f"max |θ_torch − θ_jax| after 10 + 5 steps: {gap:.2e}")
assert gap < 1e-5

# 4. Back to PyTorch: a state dict the bridge (or torch.optim.AdamW) loads.
model_back = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
checkpoint.load_into_torch(params, model_back)
opt_back = torch_bridge.AdamW(model_back.parameters(), lr=1e-2)
opt_back.load_state_dict(checkpoint.to_torch(opt_state, params, opt_back))
print("resumed in torch at step", int(opt_back.state_dict()["state"][0]["step"]))
assert int(opt_back.state_dict()["state"][0]["step"]) == 15
