"""Adam/AdamW/AMSGrad against torch.optim.Adam/AdamW (foreach=False) and the optax constructions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxopt_suite import AdamState, adam, adamw  # noqa: E402
from tests.jaxopt_suite.torch_family_utils import (  # noqa: E402
    JaxSide, TorchSide, compare, compare_scheduled, find_state, flat_vs_tree, precision,
)

LR = 1e-2
TOL64 = 1e-13
TOL32 = {"quad": 3e-6, "mlp": 2e-6}  # torch_semantics.md §7 (100 steps)
# Decoupled decay: torch rounds θ twice per step (θ(1 − lr·λ), then the Adam step), the optax form
# θ − lr(a + λθ) once; in f32 on this quad (params up to 15) that drifts to ~2.4e-5. f64 stays ≤ 1e-13.
TOL32_DECOUPLED = {"quad": 5e-5, "mlp": 1e-5}

T = torch.optim
# name: (our factory and kwargs, torch class and kwargs, problem override)
CONFIGS = {
    "adam": ((adam, {}), (T.Adam, {}), None),
    "coupled": ((adam, {"weight_decay": 0.1}), (T.Adam, {"weight_decay": 0.1}), None),
    "adamw_default_decay": ((adamw, {}), (T.AdamW, {}), None),
    "amsgrad_coupled": ((adam, {"amsgrad": True, "weight_decay": 0.1}),
                        (T.Adam, {"amsgrad": True, "weight_decay": 0.1}), None),
    "amsgrad_decoupled": ((adamw, {"amsgrad": True, "weight_decay": 0.1}),
                          (T.AdamW, {"amsgrad": True, "weight_decay": 0.1}), None),
    "eps_1e-3": ((adam, {"eps": 1e-3}), (T.Adam, {"eps": 1e-3}), None),
    "maximize": ((adam, {"maximize": True, "weight_decay": 0.1}),
                 (T.Adam, {"maximize": True, "weight_decay": 0.1}), "negquad"),
}


def _sides(config, problem, dtype):
    (fac, kw), (cls, tkw), override = CONFIGS[config]
    prob = override if (override and problem == "quad") else problem
    return (JaxSide(fac(LR, **kw), prob, dtype),
            TorchSide(lambda p: cls(p, lr=LR, foreach=False, **tkw), prob, dtype))


# maximize ascends: it runs on the negated quad only (the mlp's loss has no maximum)
CASES = [(c, p) for c in CONFIGS for p in ("quad", "mlp") if not (CONFIGS[c][2] and p == "mlp")]
# the configurations that parity/cases_torch.py also compares with torch.optim on the same problems in float64
# (adam_coupled_decay, adamw_default_decay, amsgrad_coupled, amsgrad_decoupled, adam_eps1e-3 rows, default
# suite, error-model bars): here they run with -m slow; plain Adam and maximize stay in the default suite
COVERED_BY_PARITY_ROWS = {"coupled", "adamw_default_decay", "amsgrad_coupled", "amsgrad_decoupled", "eps_1e-3"}


@pytest.mark.parametrize("config, problem", [
    pytest.param(c, p, marks=pytest.mark.slow) if c in COVERED_BY_PARITY_ROWS else (c, p) for c, p in CASES])
def test_matches_torch(config, problem):
    with precision("f64"):
        d64 = compare(*_sides(config, problem, "f64"), steps=200)
    with precision("f32"):
        d32 = compare(*_sides(config, problem, "f32"), steps=100)
    decoupled = config in ("adamw_default_decay", "amsgrad_decoupled")
    assert d64 <= TOL64, d64
    assert d32 <= (TOL32_DECOUPLED if decoupled else TOL32)[problem], d32


def test_complex_params_follow_view_as_real():
    """torch steps complex params as (re, im) pairs; we receive torch's gradient (= conj of jax.grad)."""
    with precision("f64"):
        diff = compare(JaxSide(adam(LR, weight_decay=0.1, amsgrad=True), "cquad", "f64"),
                       TorchSide(lambda p: T.Adam(p, lr=LR, weight_decay=0.1, amsgrad=True, foreach=False),
                                 "cquad", "f64"), steps=100)
        # optax's |g|² convention is a different rule for complex leaves
        wrong = compare(JaxSide(optax.adam(LR, eps_root=0.0), "cquad", "f64"),
                        TorchSide(lambda p: T.Adam(p, lr=LR, foreach=False), "cquad", "f64"), steps=100)
    assert diff <= TOL64, diff
    assert wrong > 10 * TOL64, wrong
    z = jnp.array([1.0 + 2.0j, -0.5 + 0.25j])
    loss = lambda z: jnp.sum(jnp.abs(z - 0.5j) ** 2)  # noqa: E731
    np.testing.assert_allclose(np.conj(np.asarray(jax.grad(loss)(z))), 2 * (np.asarray(z) - 0.5j))


@pytest.mark.parametrize("problem", ["quad", "mlp"])
def test_matches_optax(problem):
    with precision("f64"):
        plain = compare(JaxSide(adam(LR), problem, "f64"), JaxSide(optax.adam(LR, eps_root=0.0), problem, "f64"))
        coupled = compare(JaxSide(adam(LR, weight_decay=0.1), problem, "f64"),
                          JaxSide(optax.chain(optax.add_decayed_weights(0.1), optax.adam(LR)), problem, "f64"))
        decoupled = compare(JaxSide(adamw(LR, weight_decay=0.1), problem, "f64"),
                            JaxSide(optax.adamw(LR, weight_decay=0.1), problem, "f64"))
    assert max(plain, coupled, decoupled) <= TOL64, (plain, coupled, decoupled)


def test_amsgrad_is_not_optax_amsgrad():
    """Sensitivity: optax.amsgrad takes the max of the bias-corrected ν̂, torch of the raw v."""
    with precision("f64"):
        wrong = compare(JaxSide(optax.amsgrad(LR), "mlp", "f64"),
                        TorchSide(lambda p: T.Adam(p, lr=LR, amsgrad=True, foreach=False), "mlp", "f64"))
    assert wrong > 10 * TOL64 and wrong > 1e-3, wrong


def test_pow_bias_correction_is_far_in_f32():
    """Sensitivity: 1 − β2^t formed with a float32 power (optax's form) drifts > 10× our f32 tolerance."""
    lr = 1e-1
    with precision("f32"):
        ours = compare(JaxSide(adam(lr), "quad", "f32"),
                       TorchSide(lambda p: T.Adam(p, lr=lr, foreach=False), "quad", "f32"), steps=100)
        wrong = compare(JaxSide(optax.adam(lr), "quad", "f32"),
                        TorchSide(lambda p: T.Adam(p, lr=lr, foreach=False), "quad", "f32"), steps=100)
    assert ours <= TOL32["quad"], ours
    assert wrong > 10 * TOL32["quad"], wrong


def test_none_gradient_skips_leaf_like_torch():
    masks = lambda t: [True, t != 1]  # noqa: E731
    with precision("f64"):
        ours = JaxSide(adamw(LR, weight_decay=0.1, amsgrad=True), "quad", "f64")
        ref = TorchSide(lambda p: T.AdamW(p, lr=LR, weight_decay=0.1, amsgrad=True, foreach=False), "quad", "f64")
        diff = compare(ours, ref, steps=3, masks=masks)
        state = find_state(ours.state, AdamState)
        st = [ref.opt.state[p] for p in ref.params]
        assert [int(c) for c in state.count] == [int(s["step"]) for s in st] == [3, 2]
        for i in range(2):
            for ours_field, key in [("mu", "exp_avg"), ("nu", "exp_avg_sq"), ("nu_max", "max_exp_avg_sq")]:
                np.testing.assert_allclose(np.asarray(getattr(state, ours_field)[i]), st[i][key].numpy(),
                                           rtol=1e-13, atol=1e-15)
    assert diff <= TOL64, diff

    tx = adamw(LR, weight_decay=0.1)
    params = [jnp.ones(3), jnp.full(2, 2.0)]
    grads = [jnp.full(3, 0.5), jnp.full(2, -0.3)]
    _, state = tx.update(grads, tx.init(params), params)
    u, new = tx.update(grads, state, params, grad_mask=[True, False])
    np.testing.assert_array_equal(np.asarray(u[1]), 0.0)  # no decoupled decay either
    old, nw = find_state(state, AdamState), find_state(new, AdamState)
    for field in ("count", "mu", "nu"):
        np.testing.assert_array_equal(np.asarray(getattr(old, field)[1]), np.asarray(getattr(nw, field)[1]))


def test_step_counts_are_one_vector_in_leaf_order():
    """Per-tensor counts live in one int32 vector (leaf order); a masked leaf keeps its entry."""
    tx = adam(LR)
    params = {"b": jnp.ones(2), "a": [jnp.ones((2, 3)), jnp.ones(4)]}  # leaf order: a[0], a[1], b
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    state = tx.init(params)
    core = find_state(state, AdamState)
    assert core.count.shape == (3,) and core.count.dtype == jnp.int32
    # as many state buffers as optax.adam's: one count, then m and v per tensor
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(optax.adam(LR).init(params)))
    mask = {"b": True, "a": [True, False]}
    step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, grad_mask=m))
    for _ in range(2):
        u, state = step(grads, state, params, mask)
    assert np.asarray(find_state(state, AdamState).count).tolist() == [2, 0, 2]
    np.testing.assert_array_equal(np.asarray(u["a"][1]), 0.0)
    # the first step of a[1] after being skipped is a first step (bias corrections at t = 1)
    u_fresh, _ = tx.update(grads, tx.init(params), params)
    u_late, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(np.asarray(u_late["a"][1]), np.asarray(u_fresh["a"][1]))


def test_flat_layout_matches_pytree():
    masks = lambda t: [True, t % 3 != 1]  # noqa: E731
    with precision("f64"):
        diff, pad, state = flat_vs_tree(
            lambda segments: adam(LR, weight_decay=0.1, amsgrad=True, segments=segments), masks=masks)
    assert diff <= 1e-12, diff
    assert pad == 0.0, pad
    assert np.asarray(find_state(state, AdamState).count[0]).tolist() == [30, 20, 30]


@pytest.mark.parametrize("factory", [adam, adamw])
@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"b1": 1.0}, "b1"),
    ({"b1": -0.1}, "b1"),
    ({"b2": 1.0}, "b2"),
    ({"b2": 2.0}, "b2"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -1e-2}, "weight_decay"),
])
def test_bad_hyperparameters(factory, kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        factory(**kwargs)
    assert "allowed range" in str(err.value)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_torch_schedulers_through_inject_hyperparams(schedule):
    """CosineAnnealingLR moves lr; OneCycleLR also moves β1 (cycle_momentum), which we read every step."""
    steps = 60
    with precision("f64"):
        ours = JaxSide(optax.inject_hyperparams(adamw, hyperparam_dtype=jnp.float64)(LR, weight_decay=0.1),
                       "mlp", "f64")
        ref = TorchSide(lambda p: T.AdamW(p, lr=LR, weight_decay=0.1, foreach=False), "mlp", "f64")
        if schedule == "cosine":
            sched = T.lr_scheduler.CosineAnnealingLR(ref.opt, T_max=steps)
        else:
            sched = T.lr_scheduler.OneCycleLR(ref.opt, max_lr=5 * LR, total_steps=steps + 1)
        read = lambda g: {"learning_rate": g["lr"], "b1": g["betas"][0], "b2": g["betas"][1]}  # noqa: E731
        diff = compare_scheduled(ours, ref, sched, read, steps=steps)
    assert diff <= TOL64, diff
