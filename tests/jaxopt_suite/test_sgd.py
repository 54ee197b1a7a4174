"""SGD against torch.optim.SGD (foreach=False) and the optax chains that reproduce it."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxopt_suite import SGDState, sgd  # noqa: E402
from tests.jaxopt_suite.torch_family_utils import (  # noqa: E402
    JaxSide, TorchSide, compare, compare_scheduled, find_state, flat_vs_tree, precision,
)

LR, MU = 0.05, 0.9
TOL64, TOL32 = 1e-13, 5e-6  # torch_semantics.md §7 (f32: 100 steps)

# name: (our kwargs, torch kwargs, problem); maximize runs use the negated quad so they converge
CONFIGS = {
    "plain": ({}, {}, None),
    "momentum_decay": ({"momentum": MU, "weight_decay": 0.1}, {"momentum": MU, "weight_decay": 0.1}, None),
    "dampening": ({"momentum": MU, "dampening": 0.5}, {"momentum": MU, "dampening": 0.5}, None),
    "nesterov_decay_maximize": (
        {"momentum": MU, "weight_decay": 0.1, "nesterov": True, "maximize": True},
        {"momentum": MU, "weight_decay": 0.1, "nesterov": True, "maximize": True}, "negquad"),
}


def torch_sgd(**kw):
    return lambda p: torch.optim.SGD(p, lr=LR, foreach=False, **kw)


def _problem(config, problem):
    override = CONFIGS[config][2]
    return override if (override and problem == "quad") else problem


# maximize ascends: it runs on the negated quad only (the mlp's loss has no maximum)
CASES = [(c, p) for c in CONFIGS for p in ("quad", "mlp") if not (CONFIGS[c][2] and p == "mlp")]
# the configurations that parity/cases_torch.py also compares with torch.optim on the same problems in float64
# (sgd_dampening, which adds weight decay, and sgd_nesterov_decay_maximize rows, default suite, error-model
# bars): here they run with -m slow; plain SGD and momentum with decay stay in the default suite
COVERED_BY_PARITY_ROWS = {"dampening", "nesterov_decay_maximize"}


@pytest.mark.parametrize("config, problem", [
    pytest.param(c, p, marks=pytest.mark.slow) if c in COVERED_BY_PARITY_ROWS else (c, p) for c, p in CASES])
def test_matches_torch(config, problem):
    ours_kw, ref_kw, _ = CONFIGS[config]
    prob = _problem(config, problem)
    with precision("f64"):
        d64 = compare(JaxSide(sgd(LR, **ours_kw), prob, "f64"), TorchSide(torch_sgd(**ref_kw), prob, "f64"), steps=200)
    with precision("f32"):
        d32 = compare(JaxSide(sgd(LR, **ours_kw), prob, "f32"), TorchSide(torch_sgd(**ref_kw), prob, "f32"), steps=100)
    assert d64 <= TOL64, d64
    assert d32 <= TOL32, d32


def test_complex_params():
    with precision("f64"):
        diff = compare(JaxSide(sgd(LR, MU, weight_decay=0.1), "cquad", "f64"),
                       TorchSide(torch_sgd(momentum=MU, weight_decay=0.1), "cquad", "f64"), steps=100)
    assert diff <= TOL64, diff


@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_optax_chains(nesterov):
    with precision("f64"):
        plain = compare(JaxSide(sgd(LR, MU, nesterov=nesterov), "quad", "f64"),
                        JaxSide(optax.sgd(LR, MU, nesterov=nesterov), "quad", "f64"))
        decay = compare(JaxSide(sgd(LR, MU, weight_decay=0.1, nesterov=nesterov), "quad", "f64"),
                        JaxSide(optax.chain(optax.add_decayed_weights(0.1), optax.sgd(LR, MU, nesterov=nesterov)),
                                "quad", "f64"))
        maxi = compare(JaxSide(sgd(LR, MU, weight_decay=0.1, nesterov=nesterov, maximize=True), "negquad", "f64"),
                       JaxSide(optax.chain(optax.scale(-1.0), optax.add_decayed_weights(0.1),
                                           optax.sgd(LR, MU, nesterov=nesterov)), "negquad", "f64"))
    assert max(plain, decay, maxi) <= TOL64, (plain, decay, maxi)


def test_dampening_is_not_optax_sgd():
    """Sensitivity: optax.sgd has no dampening; against torch's dampening 0.5 it is far off."""
    with precision("f64"):
        wrong = compare(JaxSide(optax.sgd(LR, MU), "quad", "f64"),
                        TorchSide(torch_sgd(momentum=MU, dampening=0.5), "quad", "f64"))
    assert wrong > 10 * TOL64 and wrong > 0.1, wrong


def test_none_gradient_skips_leaf_like_torch():
    masks = lambda t: [True, t != 1]  # noqa: E731
    with precision("f64"):
        ours = JaxSide(sgd(LR, MU, dampening=0.3, weight_decay=0.1), "quad", "f64")
        ref = TorchSide(torch_sgd(momentum=MU, dampening=0.3, weight_decay=0.1), "quad", "f64")
        diff = compare(ours, ref, steps=3, masks=masks)
        state = find_state(ours.state, SGDState)
        assert [int(c) for c in state.count] == [3, 2]
        for i, p in enumerate(ref.params):
            np.testing.assert_allclose(np.asarray(state.momentum_buffer[i]),
                                       ref.opt.state[p]["momentum_buffer"].numpy(), rtol=1e-14, atol=1e-14)
    assert diff <= TOL64, diff

    tx = sgd(LR, MU, weight_decay=0.1)
    params = [jnp.ones(3), jnp.full(2, 2.0)]
    grads = [jnp.full(3, 0.5), jnp.full(2, -0.3)]
    _, state = tx.update(grads, tx.init(params), params)
    u, new = tx.update(grads, state, params, grad_mask=[True, False])
    np.testing.assert_array_equal(np.asarray(u[1]), 0.0)  # no decay either
    old, nw = find_state(state, SGDState), find_state(new, SGDState)
    for field in SGDState._fields:
        np.testing.assert_array_equal(np.asarray(getattr(old, field)[1]), np.asarray(getattr(nw, field)[1]))


def test_zero_gradient_still_steps():
    tx = sgd(LR, MU, weight_decay=0.1)
    params = [jnp.ones(3)]
    state = tx.init(params)
    u, _ = tx.update([jnp.zeros(3)], state, params)
    np.testing.assert_allclose(np.asarray(u[0]), -LR * 0.1, rtol=1e-6)


def test_momentum_raised_from_zero_creates_buffer_like_torch():
    """A momentum scheduled from 0 to 0.9 mid-run starts the buffer at b = g at that step, as torch does."""
    with precision("f64"):
        ours = JaxSide(optax.inject_hyperparams(sgd, hyperparam_dtype=jnp.float64)(LR, 0.0), "quad", "f64")
        ref = TorchSide(torch_sgd(momentum=0.0), "quad", "f64")
        diff = compare(ours, ref, steps=5)
        ours.state.hyperparams["momentum"] = jnp.asarray(0.9, jnp.float64)
        for group in ref.opt.param_groups:
            group["momentum"] = 0.9
        diff = max(diff, compare(ours, ref, steps=20))
    assert diff <= TOL64, diff


def test_flat_layout_matches_pytree():
    masks = lambda t: [True, t % 3 != 1]  # noqa: E731
    with precision("f64"):
        diff, pad, _ = flat_vs_tree(lambda segments: sgd(LR, MU, 0.2, 0.1, segments=segments), masks=masks)
    assert diff <= 1e-12, diff
    assert pad == 0.0, pad


@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"momentum": -0.5}, "momentum"),
    ({"momentum": 1.5}, "momentum"),
    ({"dampening": -0.1}, "dampening"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"nesterov": True}, "nesterov"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov"),
    ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        sgd(**kwargs)
    msg = str(err.value)
    assert "allowed range" in msg or "requires" in msg


def test_inject_hyperparams_with_bfloat16_params():
    """inject_hyperparams casts hyperparameters to the params' dtype; bf16 values must pass validation."""
    tx = optax.inject_hyperparams(sgd)(learning_rate=0.1, momentum=0.9, weight_decay=1e-2)
    params = [jnp.ones(3, jnp.bfloat16)]
    state = tx.init(params)
    assert state.hyperparams["learning_rate"].dtype == jnp.bfloat16
    u, _ = tx.update([jnp.ones(3, jnp.bfloat16)], state, params)
    assert u[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_torch_schedulers_through_inject_hyperparams(schedule):
    """CosineAnnealingLR with Nesterov SGD; OneCycleLR also moves the momentum, which we read every step."""
    steps = 60
    with precision("f64"):
        ours = JaxSide(optax.inject_hyperparams(sgd, static_args=("nesterov",), hyperparam_dtype=jnp.float64)(
            LR, MU, weight_decay=0.1, nesterov=True), "mlp", "f64")
        ref = TorchSide(torch_sgd(momentum=MU, weight_decay=0.1, nesterov=True), "mlp", "f64")
        if schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref.opt, T_max=steps)
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(ref.opt, max_lr=2 * LR, total_steps=steps + 1)
        read = lambda g: {"learning_rate": g["lr"], "momentum": g["momentum"]}  # noqa: E731
        diff = compare_scheduled(ours, ref, sched, read, steps=steps)
    assert diff <= TOL64, diff
