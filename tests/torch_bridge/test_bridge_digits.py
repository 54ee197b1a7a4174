"""Every bridge class on an MLP on sklearn's digits: the bridge equals torch.optim's optimizer of the same
name (where one exists) and the pure JAX optimizer started from the same weights.

f64 (JAX x64 on): max |Δθ| <= 1e-10 over 100 steps; f32: <= 1e-5 relative to the parameter scale.
"""

import warnings

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


pytestmark = pytest.mark.usefixtures("one_torch_thread")

def bridge(name, **kw):
    return lambda params, flat=True: getattr(tb, name)(params, flat=flat, **kw)


def torch_ref(name, **kw):
    return lambda params: getattr(torch.optim, name)(params, foreach=False, **kw)


def adopt_ref(**kw):
    import adopt

    return lambda params: adopt.ADOPT(params, foreach=False, **kw)


def lookahead_bridge(inner, k, alpha):
    return lambda params, flat=True: tb.Lookahead(inner(params, flat=flat), k=k, alpha=alpha)


def lookahead_ref(inner, k, alpha):
    return lambda params: tb.Lookahead(inner(params), k=k, alpha=alpha)  # plain-torch Lookahead


# (id, bridge constructor, torch reference constructor or None, JAX factory, JAX kwargs)
CASES = [
    ("sgd", bridge("SGD", lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2),
     torch_ref("SGD", lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2),
     jaxopt_suite.sgd, dict(learning_rate=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2)),
    ("sgd_nesterov", bridge("SGD", lr=0.05, momentum=0.9, nesterov=True),
     torch_ref("SGD", lr=0.05, momentum=0.9, nesterov=True),
     jaxopt_suite.sgd, dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    ("adam", bridge("Adam", lr=1e-2, weight_decay=0.1), torch_ref("Adam", lr=1e-2, weight_decay=0.1),
     jaxopt_suite.adam, dict(learning_rate=1e-2, weight_decay=0.1)),
    ("amsgrad", bridge("Adam", lr=1e-2, amsgrad=True), torch_ref("Adam", lr=1e-2, amsgrad=True),
     jaxopt_suite.adam, dict(learning_rate=1e-2, amsgrad=True)),
    ("adamw", bridge("AdamW", lr=1e-2), torch_ref("AdamW", lr=1e-2), jaxopt_suite.adamw, dict(learning_rate=1e-2)),
    # ADOPT with coupled decay at lr 1e-2 is chaotic on this problem (ε-floored, clipped directions): there
    # torch-adopt and pure JAX already differ by 3e-7 after 100 f64 steps, so lr 1e-3 is used.
    ("adopt", bridge("ADOPT", lr=1e-3, weight_decay=1e-2), adopt_ref(lr=1e-3, weight_decay=1e-2),
     jaxopt_suite.adopt, dict(learning_rate=1e-3, weight_decay=1e-2)),
    ("adopt_decouple", bridge("ADOPT", lr=1e-2, weight_decay=0.1, decouple=True),
     adopt_ref(lr=1e-2, weight_decay=0.1, decouple=True),
     jaxopt_suite.adopt, dict(learning_rate=1e-2, weight_decay=0.1, decouple=True)),
    ("asgd", bridge("ASGD", lr=0.05, t0=10, lambd=1e-2, weight_decay=1e-3),
     torch_ref("ASGD", lr=0.05, t0=10, lambd=1e-2, weight_decay=1e-3),
     jaxopt_suite.asgd, dict(learning_rate=0.05, t0=10, lambd=1e-2, weight_decay=1e-3)),
    ("asgd_momentum", bridge("ASGD", lr=0.03125, lambd=0.0, momentum=0.9),
     torch_ref("SGD", lr=0.03125, momentum=0.9),
     jaxopt_suite.asgd, dict(learning_rate=0.03125, lambd=0.0, momentum=0.9)),
    ("lookahead_sgd", lookahead_bridge(bridge("SGD", lr=0.05, momentum=0.9), 5, 0.8),
     lookahead_ref(torch_ref("SGD", lr=0.05, momentum=0.9), 5, 0.8),
     jaxopt_suite.lookahead_sgd, dict(learning_rate=0.05, momentum=0.9, sync_period=5, slow_step_size=0.8)),
    ("lookahead_adam", lookahead_bridge(bridge("Adam", lr=1e-2), 5, 0.8),
     lookahead_ref(torch_ref("Adam", lr=1e-2), 5, 0.8),
     jaxopt_suite.lookahead_adam, dict(learning_rate=1e-2, sync_period=5, slow_step_size=0.8)),
]


def digits(dtype):
    x, y = load_digits(return_X_y=True)
    x = (x[:256] / 16.0).astype(np.float64)
    return torch.tensor(x, dtype=dtype), torch.tensor(y[:256], dtype=torch.long)


def model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).to(dtype)


def run_torch(make, dtype, **extra):
    net = model(dtype)
    opt = make(list(net.parameters()), **extra)
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
    _, make, ref, factory, jkw = case
    with jax.enable_x64(True):
        flat = run_torch(make, torch.float64)
        pure = run_jax(factory, jkw, torch.float64)
        assert max_abs(flat, pure) <= 1e-10
        if ref is not None:
            assert max_abs(flat, run_torch(ref, torch.float64)) <= 1e-10


@pytest.mark.parametrize("case", CASES[::3], ids=[c[0] for c in CASES[::3]])
def test_digits_flat_equals_simple_f64(case):
    _, make, _, _, _ = case
    with jax.enable_x64(True):
        assert max_abs(run_torch(make, torch.float64), run_torch(make, torch.float64, flat=False)) <= 1e-14


# ADOPT is compared in f64 only: its ε floor and clipping amplify f32 rounding (spec: 3.5e-3 on an MLP).
F32_CASES = [c for c in CASES[::2] if not c[0].startswith("adopt")]


@pytest.mark.parametrize("case", F32_CASES, ids=[c[0] for c in F32_CASES])
def test_digits_f32(case):
    _, make, ref, factory, jkw = case
    ours = run_torch(make, torch.float32)
    scale = max(float(np.max(np.abs(p))) for p in ours)
    assert max_abs(ours, run_jax(factory, jkw, torch.float32)) <= 1e-5 * scale
    if ref is not None:
        assert max_abs(ours, run_torch(ref, torch.float32)) <= 1e-5 * scale
