"""The AutoSGM README problem, defined once for the AutoSGM tests and parity rows (torch computes the gradients).

Model ``Linear(10, 50) - ReLU - Linear(50, 1)`` initialised under ``torch.manual_seed(0)``; data
X ~ N(0, 1) (1024 × 10), y = X·w* + 0.5·sin(3·X[:, 0]) + 0.1·noise from one generator seeded 0; MSE on
minibatches of 64 drawn with replacement from a generator seeded 1. Both sides of a comparison see the same
initial values and the same batches; only the optimizer arithmetic differs.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

NUM_SAMPLES, NUM_FEATURES, HIDDEN, BATCH = 1024, 10, 50, 64


def data(dtype=torch.float64):
    # drawn in float32 (torch's default dtype) whatever the run's dtype: the same data for every dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=gen, dtype=torch.float32)
    w_star = torch.randn(NUM_FEATURES, 1, generator=gen, dtype=torch.float32)
    noise = torch.randn(NUM_SAMPLES, 1, generator=gen, dtype=torch.float32)
    y = x @ w_star + 0.5 * torch.sin(3.0 * x[:, :1]) + 0.1 * noise
    return x.to(dtype), y.to(dtype)


def batches(steps: int):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, NUM_SAMPLES, (BATCH,), generator=gen) for _ in range(steps)]


def model(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1))
    return net.to(dtype)


def x64_for(dtype):
    """The JAX x64 context a torch dtype needs (float64 tests must not flip x64 globally)."""
    return jax.enable_x64(True) if dtype == torch.float64 else contextlib.nullcontext()


def loss_and_grads(net, x, y, idx, sign=1.0):
    net.zero_grad(set_to_none=True)
    loss = sign * torch.nn.functional.mse_loss(net(x[idx]), y[idx])
    loss.backward()
    return loss


def full_loss(net, x, y) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net(x), y))


def run_torch(make_optimizer, steps: int, dtype=torch.float64, make_scheduler=None, sign=1.0):
    """Closed loop with a torch optimizer; returns the final parameters (numpy, by name) and the net.

    ``sign = -1`` trains on the negated loss (for maximizing optimizers).
    """
    x, y = data(dtype)
    net = model(dtype)
    opt = make_optimizer(net.parameters())
    sched = make_scheduler(opt) if make_scheduler is not None else None
    for idx in batches(steps):
        loss_and_grads(net, x, y, idx, sign)
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach().numpy().copy() for k, v in net.named_parameters()}, net


def run_jax(tx, steps: int, dtype=torch.float64, jit: bool = True, sign=1.0):
    """Closed loop with an optax transformation; torch computes the gradients at the JAX parameters."""
    x, y = data(dtype)
    net = model(dtype)
    names = [k for k, _ in net.named_parameters()]
    with x64_for(dtype):
        params = {k: jnp.asarray(v.detach().numpy()) for k, v in net.named_parameters()}
        state = tx.init(params)
        update = jax.jit(tx.update) if jit else tx.update
        for idx in batches(steps):
            with torch.no_grad():
                for k, p in net.named_parameters():
                    p.copy_(torch.from_numpy(np.array(params[k])))
            loss_and_grads(net, x, y, idx, sign)
            grads = {k: jnp.asarray(p.grad.numpy()) for k, p in net.named_parameters()}
            updates, state = update(grads, state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        out = {k: np.array(params[k]) for k in names}  # writable copies, for torch.from_numpy
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(torch.from_numpy(out[k]))
    return out, net


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def run_jax_native(tx, steps: int, dtype=torch.float32):
    """The same problem entirely in JAX (one jitted ``lax.scan``); returns params (numpy) and final full loss."""
    x, y = data(dtype)
    net = model(dtype)
    idx = np.stack([b.numpy() for b in batches(steps)])
    with x64_for(dtype):
        params = {k: jnp.asarray(v.detach().numpy()) for k, v in net.named_parameters()}
        xs, ys = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

        def loss_fn(p, xb, yb):
            hidden = jax.nn.relu(xb @ p["0.weight"].T + p["0.bias"])
            return jnp.mean((hidden @ p["2.weight"].T + p["2.bias"] - yb) ** 2)

        def body(carry, batch):
            p, s = carry
            grads = jax.grad(loss_fn)(p, xs[batch], ys[batch])
            updates, s = tx.update(grads, s, p)
            return (jax.tree.map(lambda a, u: a + u, p, updates), s), None

        (params, _), _ = jax.jit(lambda p, s, b: jax.lax.scan(body, (p, s), b))(params, tx.init(params),
                                                                               jnp.asarray(idx))
        final = float(loss_fn(params, xs, ys))
    return {k: np.asarray(v) for k, v in params.items()}, final
