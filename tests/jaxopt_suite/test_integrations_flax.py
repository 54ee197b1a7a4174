"""integrations.flax.apply_gradients: same as TrainState.apply_gradients, plus extra args reach the optimizer."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax.training import train_state  # noqa: E402

import jaxopt_suite  # noqa: E402
from jaxopt_suite.integrations.flax import apply_gradients  # noqa: E402


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(8)(x)))


def _setup(tx):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)), jnp.float32)
    y = jnp.sum(x, axis=1, keepdims=True)
    model = _Net()
    params = model.init(jax.random.key(0), x)["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    def loss_fn(p):
        return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

    return state, jax.jit(jax.value_and_grad(loss_fn))


@pytest.mark.parametrize("make_tx", [
    lambda: jaxopt_suite.sgd(0.05, 0.9),
    lambda: jaxopt_suite.adamw(1e-2),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), jaxopt_suite.adam(1e-2)),
], ids=["sgd", "adamw", "clip-adam"])
def test_matches_flax_apply_gradients_without_extras(make_tx):
    ours, value_and_grad = _setup(make_tx())
    theirs = ours
    ours_step = jax.jit(lambda s, g: apply_gradients(s, g))
    theirs_step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    for _ in range(5):
        ours = ours_step(ours, value_and_grad(ours.params)[1])
        theirs = theirs_step(theirs, value_and_grad(theirs.params)[1])
    assert int(ours.step) == int(theirs.step) == 5
    for a, b in zip(jax.tree.leaves((ours.params, ours.opt_state)), jax.tree.leaves((theirs.params, theirs.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_delivers_value_to_reduce_on_plateau():
    # reduce_on_plateau scales the update by a factor that drops when the loss it receives stops improving;
    # feeding a constant high loss must shrink the scale, which is only possible if value arrives.
    tx = optax.chain(jaxopt_suite.sgd(0.1), optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0))
    state, value_and_grad = _setup(tx)
    loss, grads = value_and_grad(state.params)
    with pytest.raises(TypeError, match="value"):
        state.apply_gradients(grads=grads, value=loss)  # flax does not forward it
    step = jax.jit(lambda s, g, v: apply_gradients(s, g, value=v))
    for _ in range(6):
        state = step(state, grads, jnp.asarray(10.0))
    assert float(state.opt_state[1].scale) < 1.0
    assert int(state.step) == 6


def test_value_changes_the_result_only_for_optimizers_that_use_it():
    tx = optax.chain(jaxopt_suite.adam(1e-2), optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0))
    a, value_and_grad = _setup(tx)
    b = a
    _, grads = value_and_grad(a.params)
    step = jax.jit(lambda s, g, v: apply_gradients(s, g, value=v))
    for i in range(4):
        a = step(a, grads, jnp.asarray(1.0 - 0.1 * i))  # improving: scale stays 1
        b = step(b, grads, jnp.asarray(1.0))  # flat: scale drops
    assert float(a.opt_state[1].scale) == 1.0 and float(b.opt_state[1].scale) < 1.0
    # A transformation that ignores value gives identical params whatever value is passed.
    c, _ = _setup(jaxopt_suite.adam(1e-2))
    d = c
    with_value = jax.jit(lambda s, g, v: apply_gradients(s, g, value=v))
    without = jax.jit(lambda s, g: apply_gradients(s, g))
    for i in range(3):
        c = with_value(c, grads, jnp.asarray(float(i)))
        d = without(d, grads)
    for x, y in zip(jax.tree.leaves(c.params), jax.tree.leaves(d.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fp8_overwrite_with_gradient_collection():
    from flax.linen import fp8_ops

    key = fp8_ops.OVERWRITE_WITH_GRADIENT
    params = {"params": {"w": jnp.ones(3)}, key: {"scale": jnp.ones(())}}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=jaxopt_suite.sgd(0.5))
    grads = {"params": {"w": jnp.full(3, 2.0)}, key: {"scale": jnp.asarray(7.0)}}
    ours = apply_gradients(state, grads)
    theirs = state.apply_gradients(grads=grads)
    np.testing.assert_array_equal(ours.params["params"]["w"], theirs.params["params"]["w"])
    np.testing.assert_array_equal(ours.params["params"]["w"], jnp.zeros(3))
    assert float(ours.params[key]["scale"]) == 7.0


def test_core_package_does_not_import_flax_integration():
    code = "import sys, jaxopt_suite; print('jaxopt_suite.integrations.flax' in sys.modules, 'flax' in sys.modules)"
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env)
    assert out.stdout.split() == ["False", "False"]
