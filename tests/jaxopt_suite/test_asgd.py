"""ASGD against torch.optim.ASGD (foreach=False, both scalar dtypes) and the momentum option against torch SGD."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxopt_suite import ASGDState, asgd, asgd_averaged_params  # noqa: E402
from tests.jaxopt_suite.torch_family_utils import (  # noqa: E402
    JaxSide, TorchSide, compare, find_state, flat_vs_tree, max_diff, precision,
)

LR = 1e-2
REQUIRED = dict(lambd=1e-2, t0=10.0, weight_decay=1e-3)  # torch_semantics.md §7: ax is averaged from step 12
TOL64 = 1e-13
# f32, 100 steps. §7 gives 5e-6; on this quad (params up to 15) we measure up to 6.7e-6 because torch's CPU
# ``add(other, alpha=-η)`` is a fused multiply-add (one rounding) that a float32 XLA program cannot form.
TOL32 = {"quad": 1e-5, "mlp": 5e-6, "cquad": 5e-6}


@contextlib.contextmanager
def torch_default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def torch_asgd(**kw):
    return lambda p: torch.optim.ASGD(p, lr=LR, foreach=False, **kw)


def torch_ax(side):
    return [side.opt.state[p]["ax"].numpy() for p in side.params]


@pytest.mark.parametrize("problem", ["quad", "mlp", "cquad"])
@pytest.mark.parametrize("scalar_dtype", ["float32", "float64"])
def test_matches_torch_f64_params_and_average(problem, scalar_dtype):
    """f64 params; η and μ rounded to float32 (torch's default dtype) or kept in float64 (default float64)."""
    torch_dtype = torch.float64 if scalar_dtype == "float64" else torch.float32
    with precision("f64"), torch_default_dtype(torch_dtype):
        ours = JaxSide(asgd(LR, scalar_dtype=scalar_dtype, **REQUIRED), problem, "f64")
        ref = TorchSide(torch_asgd(**REQUIRED), problem, "f64")
        diff = compare(ours, ref, steps=200)
        ax = max_diff(asgd_averaged_params(ours.state), torch_ax(ref))
        state = find_state(ours.state, ASGDState)
        for i, p in enumerate(ref.params):
            st = ref.opt.state[p]
            assert state.eta[i].dtype == jnp.dtype(scalar_dtype)
            np.testing.assert_array_equal(np.asarray(state.eta[i]), st["eta"].numpy())
            np.testing.assert_array_equal(np.asarray(state.avg_weight[i]), st["mu"].numpy())
            assert int(state.count[i]) == int(st["step"]) == 200
        # sensitivity: the other scalar dtype drifts far beyond the tolerance
        other = "float64" if scalar_dtype == "float32" else "float32"
        wrong = compare(JaxSide(asgd(LR, scalar_dtype=other, **REQUIRED), problem, "f64"),
                        TorchSide(torch_asgd(**REQUIRED), problem, "f64"), steps=200)
    assert diff <= TOL64, diff
    assert ax <= TOL64, ax
    assert wrong > 10 * TOL64, wrong


def test_average_is_uniform_mean_after_t0():
    """ax = θ through step t0 + 2, then the uniform mean of θ over steps t0 + 2 … t (μ kept in float64)."""
    with precision("f64"):
        side = JaxSide(asgd(LR, lambd=1e-2, t0=10.0, scalar_dtype="float64"), "quad", "f64")
        thetas = []
        for t in range(1, 31):
            side.step()
            thetas.append(side.fast())
            ax = asgd_averaged_params(side.state)
            if t <= 12:
                assert max_diff(ax, thetas[-1]) == 0.0
            else:
                mean = [np.mean([th[i] for th in thetas[11:]], axis=0) for i in range(2)]
                assert max_diff(ax, mean) <= 1e-13
                assert max_diff(ax, thetas[-1]) > 1e-6


@pytest.mark.parametrize("problem", ["quad", "mlp", "cquad"])
def test_matches_torch_f32(problem):
    with precision("f32"):
        ours = JaxSide(asgd(LR, **REQUIRED), problem, "f32")
        ref = TorchSide(torch_asgd(**REQUIRED), problem, "f32")
        diff = compare(ours, ref, steps=100)
        ax = max_diff(asgd_averaged_params(ours.state), torch_ax(ref))
    assert diff <= TOL32[problem], diff
    assert ax <= TOL32[problem], ax


def test_defaults_and_maximize_match_torch():
    with precision("f64"):
        d_default = compare(JaxSide(asgd(), "mlp", "f64"),
                            TorchSide(lambda p: torch.optim.ASGD(p, foreach=False), "mlp", "f64"))
        d_max = compare(JaxSide(asgd(LR, maximize=True, **REQUIRED), "quad", "f64"),
                        TorchSide(torch_asgd(maximize=True, **REQUIRED), "quad", "f64"), steps=30)
    assert d_default <= TOL64, d_default
    assert d_max <= TOL64, d_max


@pytest.mark.parametrize("problem", ["quad", "mlp"])
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_momentum_without_lambd_is_torch_sgd(problem, dtype):
    """lambd = 0 keeps η = lr, so ASGD with momentum 0.9 is torch SGD(momentum=0.9) (lr exact in f32)."""
    lr = 0.03125
    with precision(dtype):
        ours = JaxSide(asgd(lr, lambd=0.0, weight_decay=1e-3, momentum=0.9), problem, dtype)
        ref = TorchSide(lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-3, foreach=False),
                        problem, dtype)
        diff = compare(ours, ref, steps=200 if dtype == "f64" else 100)
    assert diff <= (TOL64 if dtype == "f64" else 5e-6), diff


def test_momentum_zero_is_exactly_torch_asgd():
    with precision("f64"):
        plain = JaxSide(asgd(LR, **REQUIRED), "quad", "f64")
        zero = JaxSide(asgd(LR, momentum=0.0, **REQUIRED), "quad", "f64")
        assert compare(plain, zero, steps=40) == 0.0
        # and 0.9 is a different algorithm
        far = compare(JaxSide(asgd(LR, momentum=0.9, **REQUIRED), "quad", "f64"),
                      TorchSide(torch_asgd(**REQUIRED), "quad", "f64"), steps=40)
    assert far > 1e-3


def test_none_gradient_skips_leaf_like_torch():
    """b has no gradient at step 2: after 3 steps a.step = 3, b.step = 2 and eta/mu/ax match torch."""
    masks = lambda t: [True, t != 1]  # noqa: E731
    with precision("f64"):
        ours = JaxSide(asgd(LR, lambd=0.1, t0=1.0, weight_decay=1e-3), "quad", "f64")
        ref = TorchSide(torch_asgd(lambd=0.1, t0=1.0, weight_decay=1e-3), "quad", "f64")
        diff = compare(ours, ref, steps=3, masks=masks)
        state = find_state(ours.state, ASGDState)
        st = [ref.opt.state[p] for p in ref.params]
        assert [int(c) for c in state.count] == [int(s["step"]) for s in st] == [3, 2]
        for i in range(2):
            np.testing.assert_array_equal(np.asarray(state.eta[i]), st[i]["eta"].numpy())
            np.testing.assert_array_equal(np.asarray(state.avg_weight[i]), st[i]["mu"].numpy())
        assert max_diff(state.ax, [s["ax"].numpy() for s in st]) <= TOL64
    assert diff <= TOL64, diff

    tx = asgd(LR, momentum=0.9)
    params = [jnp.ones(3), jnp.full(2, 2.0)]
    grads = [jnp.full(3, 0.5), jnp.full(2, -0.3)]
    _, state = tx.update(grads, tx.init(params), params)
    u, new = tx.update(grads, state, params, grad_mask=[True, False])
    np.testing.assert_array_equal(np.asarray(u[1]), 0.0)
    old_core, new_core = find_state(state, ASGDState), find_state(new, ASGDState)
    for field in ASGDState._fields:
        old, nw = getattr(old_core, field)[1], getattr(new_core, field)[1]
        assert old.dtype == nw.dtype
        np.testing.assert_array_equal(np.asarray(old), np.asarray(nw))
    assert int(new_core.count[0]) == 2


def test_eta_starts_at_the_current_lr():
    """A lr changed before a leaf's first step (e.g. warm-up through inject_hyperparams) is its first η."""
    tx = optax.inject_hyperparams(asgd)(learning_rate=0.1)
    params = [jnp.ones(2)]
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.5)
    u, state = tx.update([jnp.ones(2)], state, params)
    np.testing.assert_allclose(np.asarray(u[0]), -0.5 * (1 + 1e-4), rtol=1e-6)


def test_flat_layout_matches_pytree():
    masks = lambda t: [True, t % 3 != 1]  # noqa: E731
    diff, pad, state = flat_vs_tree(
        lambda segments: asgd(LR, momentum=0.5, segments=segments, **REQUIRED), masks=masks)
    assert diff == 0.0, diff
    assert pad == 0.0
    core = find_state(state, ASGDState)
    assert np.asarray(core.count[0]).tolist() == [30, 20, 30]


@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": -1e-2}, "learning_rate"),
    ({"lambd": -1e-4}, "lambd"),
    ({"alpha": -0.75}, "alpha"),
    ({"t0": -1.0}, "t0"),
    ({"weight_decay": -1e-3}, "weight_decay"),
    ({"momentum": -0.1}, "momentum"),
    ({"momentum": 1.5}, "momentum"),
    ({"scalar_dtype": "bfloat16"}, "scalar_dtype"),
])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        asgd(**kwargs)
    assert "allowed range" in str(err.value) or "expected" in str(err.value)


def test_update_requires_params():
    tx = asgd()
    params = [jnp.ones(2)]
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
