"""Every bridge class on an MLP on sklearn's digits: the bridge equals torch.optim's optimizer of the same
name (where one exists) and the pure JAX optimizer started from the same weights.

f64 (JAX x64 on): max |Δθ| <= 1e-10 over 100 steps; f32: <= 1e-5 relative to the parameter scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from sklearn.datasets import load_digits

import jaxopt_suite
import torch_bridge as tb

STEPS = 100

# (id, bridge class name, bridge kwargs, torch.optim class name or None, JAX factory, JAX kwargs)
CASES = [
    ("sgd", "SGD", dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2), "SGD",
     jaxopt_suite.sgd, dict(learning_rate=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2)),
    ("sgd_nesterov", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True), "SGD",
     jaxopt_suite.sgd, dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    ("adam", "Adam", dict(lr=1e-2, weight_decay=0.1), "Adam",
     jaxopt_suite.adam, dict(learning_rate=1e-2, weight_decay=0.1)),
    ("amsgrad", "Adam", dict(lr=1e-2, amsgrad=True), "Adam",
     jaxopt_suite.adam, dict(learning_rate=1e-2, amsgrad=True)),
    ("adamw", "AdamW", dict(lr=1e-2), "AdamW", jaxopt_suite.adamw, dict(learning_rate=1e-2)),
]


def digits(dtype):
    x, y = load_digits(return_X_y=True)
    x = (x[:256] / 16.0).astype(np.float64)
    return torch.tensor(x, dtype=dtype), torch.tensor(y[:256], dtype=torch.long)


def model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).to(dtype)


def run_torch(opt_cls, kwargs, dtype, flat=None):
    net = model(dtype)
    extra = {} if flat is None else {"flat": flat}
    opt = opt_cls(net.parameters(), **kwargs, **extra)
    x, y = digits(dtype)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return [p.detach().numpy().astype(np.float64) for p in net.parameters()]


def jax_loss(params, x, y):
    w1, b1, w2, b2 = params
    logits = jnp.tanh(x @ w1.T + b1) @ w2.T + b2
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0])


def run_jax(factory, kwargs, dtype):
    params = [jnp.asarray(p.detach().numpy()) for p in model(dtype).parameters()]
    x, y = digits(dtype)
    x, y = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    tx = factory(**kwargs)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(jax_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(STEPS):
        params, state = step(params, state)
    return [np.asarray(p, dtype=np.float64) for p in params]


def max_abs(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_digits_f64(case):
    _, name, kw, torch_name, factory, jkw = case
    with jax.enable_x64(True):
        flat = run_torch(getattr(tb, name), kw, torch.float64)
        simple = run_torch(getattr(tb, name), kw, torch.float64, flat=False)
        pure = run_jax(factory, jkw, torch.float64)
    assert max_abs(flat, pure) <= 1e-10
    assert max_abs(flat, simple) <= 1e-14
    if torch_name is not None:
        ref = run_torch(getattr(torch.optim, torch_name), {**kw, "foreach": False}, torch.float64)
        assert max_abs(flat, ref) <= 1e-10


@pytest.mark.parametrize("case", CASES[::2], ids=[c[0] for c in CASES[::2]])
def test_digits_f32(case):
    _, name, kw, torch_name, factory, jkw = case
    ours = run_torch(getattr(tb, name), kw, torch.float32)
    scale = max(float(np.max(np.abs(p))) for p in ours)
    assert max_abs(ours, run_jax(factory, jkw, torch.float32)) <= 1e-5 * scale
    if torch_name is not None:
        ref = run_torch(getattr(torch.optim, torch_name), {**kw, "foreach": False}, torch.float32)
        assert max_abs(ours, ref) <= 1e-5 * scale
