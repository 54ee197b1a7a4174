"""AutoSGM: the lowpass filter, the transform, its exact reductions to torch.optim, and its contract."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxopt_suite.autosgm import (
    AutoSGMState,
    autosgm,
    autosgm_from_config,
    autosgm_window,
    config_from_tuples,
    lowpass,
    scale_by_autosgm,
)
from tests import autosgm_support as S

BETA, BETA2, WD = 0.9, 0.999, 1e-2
STEPS = 50
WINDOW_LEN = 20


# --------------------------------------------------------------------------------------------------
# the lowpass filter
# --------------------------------------------------------------------------------------------------


def run_filter(xs, beta, gamma=0.0, eta=0.0, debias=False):
    state = jnp.zeros_like(xs[0])
    out = []
    for t, x in enumerate(xs, start=1):
        y, state = lowpass(state, x, jnp.asarray(t, jnp.int32), beta, gamma, eta, debias=debias)
        out.append(y)
    return np.stack([np.asarray(o) for o in out])


def test_filter_is_a_debiased_ema():
    with jax.enable_x64(True):
        xs = jnp.asarray(np.random.default_rng(0).normal(size=(30, 4)))
        got = run_filter(xs, 0.8, debias=True)
    ema, expected = np.zeros(4), []
    for t, x in enumerate(np.asarray(xs), start=1):
        ema = 0.8 * ema + 0.2 * x
        expected.append(ema / (1 - 0.8**t))
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-13, atol=0)


def test_filter_heavy_ball_and_nesterov_forms():
    beta = 0.9
    xs = np.random.default_rng(1).normal(size=(25, 3))
    with jax.enable_x64(True):
        hb = run_filter(jnp.asarray(xs), beta, 0.0, 1.0)
        nag = run_filter(jnp.asarray(xs), beta, beta / (1 + beta), 1.0)
    buf, hb_ref, nag_ref = np.zeros(3), [], []
    for t, g in enumerate(xs, start=1):
        buf = g if t == 1 else beta * buf + g
        hb_ref.append(buf)
        # torch's Nesterov direction g + β·b, whose first value is (1 + β)·g where the filter gives g
        nag_ref.append((g + beta * buf) / ((1 + beta) if t == 1 else 1.0))
    np.testing.assert_allclose(hb, np.stack(hb_ref), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(nag, np.stack(nag_ref), rtol=1e-12, atol=1e-14)


def test_filter_dc_gain_and_first_step():
    # Constant input: the output tends to η′/(1 − β)·x after the 1/(1 − γ) normalisation; step 1 is η′·x.
    beta, gamma, eta = 0.7, 0.3, 0.5
    with jax.enable_x64(True):
        ys = run_filter(jnp.ones((200, 1)), beta, gamma, eta)
    assert ys[0, 0] == pytest.approx(eta)
    assert ys[-1, 0] == pytest.approx(eta / (1 - beta), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# exact reductions to torch.optim (closed loop on the README problem)
# --------------------------------------------------------------------------------------------------


def _lr(dtype):
    return 2.0**-7


def _adam_lr(dtype):
    return 2.0**-10


def _lambda(fn):
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn)


HB = dict(aoptlr=False, beta_i=BETA, eta_i=1.0, debias=False)
ADAM = dict(aoptlr=True, num_lrc=0, beta_i=BETA, beta_a=BETA2, eta_i=0.0, debias=True, eps=0.0)

# name: (torch optimizer factory(params, lr), scheduler factory or None, our kwargs(lr), lr, float64 tolerance)
REDUCTIONS = {
    "sgd": (lambda p, lr: torch.optim.SGD(p, lr=lr), None,
            lambda lr: dict(learning_rate=lr, aoptlr=False, beta_i=0.0, eta_i=0.3, debias=True), _lr, 1e-12),
    "sgd_momentum": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=BETA), None,
                     lambda lr: dict(learning_rate=lr, **HB), _lr, 1e-12),
    "sgd_momentum_wd": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=BETA, weight_decay=WD), None,
                        lambda lr: dict(learning_rate=lr, weight_decay=WD, wd_level=0, **HB), _lr, 1e-12),
    "sgd_momentum_ema_form": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=BETA), None,
                              lambda lr: dict(learning_rate=lr / (1 - BETA), aoptlr=False, beta_i=BETA, eta_i=0.0,
                                              debias=False), _lr, 1e-10),
    "debiased_heavy_ball": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=BETA),
                            _lambda(lambda k: (1 - BETA) / (1 - BETA ** (k + 1))),
                            lambda lr: dict(learning_rate=lr, aoptlr=False, beta_i=BETA, eta_i=0.0, debias=True),
                            _lr, 1e-12),
    "nesterov_first_step": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=BETA, nesterov=True),
                            _lambda(lambda k: 1 / (1 + BETA) if k == 0 else 1.0),
                            lambda lr: dict(learning_rate=lr, aoptlr=False, beta_i=BETA, gamma_i=BETA / (1 + BETA),
                                            eta_i=1.0, debias=False), _lr, 1e-12),
    "adam": (lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(BETA, BETA2), eps=0.0), None,
             lambda lr: dict(learning_rate=lr, **ADAM), _adam_lr, 1e-12),
    "adam_wd": (lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(BETA, BETA2), eps=0.0, weight_decay=WD), None,
                lambda lr: dict(learning_rate=lr, weight_decay=WD, wd_level=0, **ADAM), _adam_lr, 1e-12),
    "adamw": (lambda p, lr: torch.optim.AdamW(p, lr=lr, betas=(BETA, BETA2), eps=0.0, weight_decay=WD), None,
              lambda lr: dict(learning_rate=lr, weight_decay=WD / (1 - BETA), wd_level=1, **ADAM), _adam_lr, 1e-12),
    "rmsprop": (lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=BETA2, eps=0.0), None,
                lambda lr: dict(learning_rate=lr, aoptlr=True, beta_i=0.0, beta_a=BETA2, debias=False, eps=0.0),
                _adam_lr, 1e-12),
    "heavy_ball_cosine_window": (
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=BETA),
        _lambda(lambda k: math.cos(math.pi * (k % WINDOW_LEN) / (2 * WINDOW_LEN)) ** 2),
        lambda lr: dict(learning_rate=lr, window=autosgm_window(1, n=2, m=1, cfact=1, tau=1, spe=WINDOW_LEN), **HB),
        _lr, 1e-7),
    "adam_linear_window": (
        lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(BETA, BETA2), eps=0.0),
        _lambda(lambda k: 0.1 + 0.9 * (1 - (k % WINDOW_LEN) / WINDOW_LEN)),
        lambda lr: dict(learning_rate=lr, window=autosgm_window(2, n=1, m=1, x=0.1, tau=1, spe=WINDOW_LEN), **ADAM),
        _adam_lr, 1e-7),
    "sgd_momentum_maximize": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=BETA, maximize=True), None,
                              lambda lr: dict(learning_rate=lr, maximize=True, **HB), _lr, 1e-12),
}


# every row runs in float64; in float32 a representative subset runs by default, the rest with -m slow
FAST_F32 = {"sgd_momentum", "nesterov_first_step", "adam", "adamw", "rmsprop", "heavy_ball_cosine_window"}
REDUCTION_CASES = [pytest.param(name, torch.float64, id=f"{name}-f64") for name in REDUCTIONS] + [
    pytest.param(name, torch.float32, id=f"{name}-f32", marks=() if name in FAST_F32 else pytest.mark.slow)
    for name in REDUCTIONS
]


@pytest.mark.parametrize("name, dtype", REDUCTION_CASES)
def test_reduction_to_torch(name, dtype):
    make_torch, make_sched, ours, lr_of, tol64 = REDUCTIONS[name]
    lr = lr_of(dtype)
    sign = -1.0 if name.endswith("maximize") else 1.0  # ascend on −MSE
    expected, _ = S.run_torch(lambda p: make_torch(p, lr), STEPS, dtype, make_sched, sign=sign)
    got, _ = S.run_jax(autosgm(**ours(lr)), STEPS, dtype, sign=sign)
    diff = S.max_abs_diff(expected, got)
    moved = S.max_abs_diff(expected, {k: v.detach().numpy() for k, v in S.model(dtype).named_parameters()})
    assert moved > 1e-3, "the problem must move the parameters for the comparison to mean anything"
    assert diff <= (1e-6 if dtype == torch.float32 else tol64), f"{name}: max |Δp| = {diff:.3e}"


def test_nesterov_without_first_step_fix_differs():
    lr = 2.0**-7
    expected, _ = S.run_torch(lambda p: torch.optim.SGD(p, lr=lr, momentum=BETA, nesterov=True), STEPS)
    got, _ = S.run_jax(autosgm(lr, aoptlr=False, beta_i=BETA, gamma_i=BETA / (1 + BETA), eta_i=1.0, debias=False),
                       STEPS)
    assert S.max_abs_diff(expected, got) > 1e-4


def test_adam_eps_documented_difference():
    # (g + ε)² inside the moment makes ε = 1e-8 differ slightly from torch's Adam(eps=1e-8).
    lr = 2.0**-10
    expected, _ = S.run_torch(lambda p: torch.optim.Adam(p, lr=lr, betas=(BETA, BETA2), eps=1e-8), STEPS)
    got, _ = S.run_jax(autosgm(lr, beta_i=BETA, beta_a=BETA2, eps=1e-8), STEPS)
    diff = S.max_abs_diff(expected, got)
    assert 0.0 < diff <= 1e-6


# --------------------------------------------------------------------------------------------------
# numerator configurations: closed-form first step
# --------------------------------------------------------------------------------------------------


def _first_step_reference(num_lrc, w, g, lr, beta_n=0.9999, beta_a=0.999, eps=1e-10):
    """The documented first step (t = 1, debiased, γ = 0), in float64 numpy."""
    m = g  # debiased EMA at t = 1
    d = np.sqrt((g + eps) ** 2) + eps
    u, v = g / d, m / d
    q_c = (1 - beta_n) * w * w
    kappa = 1 + q_c
    if num_lrc == 0:
        return -np.float32(lr) * v
    if num_lrc == 1:
        a = np.minimum(np.abs(lr * w * v), lr * kappa)
    elif num_lrc == 2:
        z = w * v
        r = (1 - beta_a) * np.abs(z)
        a = np.minimum(np.abs(lr * np.sign(z) * np.minimum(np.abs(z), 4 * r) / kappa), lr * kappa)
    else:
        a = np.minimum((1 - beta_n) * lr * u * u, lr)
    n = np.float32(0.9 * np.mean(a))
    return -float(n) * v


@pytest.mark.parametrize("num_lrc", [0, 1, 2, 3])
def test_numerator_first_step_closed_form(num_lrc):
    rng = np.random.default_rng(num_lrc)
    w, g = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    lr = 2.0**-7
    with jax.enable_x64(True):
        tx = autosgm(lr, num_lrc=num_lrc)
        u, state = tx.update(jnp.asarray(g), tx.init(jnp.asarray(w)), jnp.asarray(w))
        np.testing.assert_allclose(np.asarray(u), _first_step_reference(num_lrc, w, g, lr), rtol=1e-6, atol=0)
        if num_lrc in (1, 2, 3):
            assert state.lr_num.dtype == jnp.float32 and float(state.lr_num) > 0


def test_huber_clips_the_step_norm():
    # With a constant ‖v‖ the Chebyshev clip keeps the step norm at 4·s (≪ ‖v‖ early on).
    rng = np.random.default_rng(3)
    w, g = rng.normal(size=(20,)), rng.normal(size=(20,))
    with jax.enable_x64(True):
        plain = autosgm(1e-2, beta_i=0.0, num_lrc=0)
        huber = autosgm(1e-2, beta_i=0.0, num_lrc=4)
        u0, _ = plain.update(jnp.asarray(g), plain.init(jnp.asarray(w)), jnp.asarray(w))
        u4, s4 = huber.update(jnp.asarray(g), huber.init(jnp.asarray(w)), jnp.asarray(w))
    v = np.asarray(u0) / -np.float32(1e-2)
    nu = np.linalg.norm(v)
    mu = np.float32(1e-4 * nu)
    delta = np.linalg.norm(v - float(mu)) + 1e-10
    s = np.sqrt(np.float32(1e-4 * delta * delta)) + np.float32(1e-10)
    expected = -np.float32(1e-2) * (v / delta) * float(np.float32(min(np.float32(delta), 4 * s)))
    np.testing.assert_allclose(np.asarray(u4), expected, rtol=1e-12)
    assert np.linalg.norm(np.asarray(u4)) < 0.1 * np.linalg.norm(np.asarray(u0))
    assert float(s4.huber_mean) == pytest.approx(float(mu))


# --------------------------------------------------------------------------------------------------
# README problem behaviour (§ "behaviour" of the spec)
# --------------------------------------------------------------------------------------------------

README_STEPS = 300
COSINE = (1, 0, 0, 2, 1, 1, README_STEPS, 1, 0)


@pytest.mark.parametrize("cfg, bound", [
    (dict(lr_cfg=(False, 1e-2, 0), beta_cfg=(0.9999, 0.999, 0.9, 0.0, 1.0, False)), 0.2),
    (dict(lr_cfg=(True, 1e-2, 0), rc_cfg=COSINE), 0.2),
    (dict(lr_cfg=(True, 1e-2, 1), beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True), rc_cfg=COSINE), 0.2),
    (dict(lr_cfg=(True, 1e-2, 2), rc_cfg=COSINE), 0.25),
], ids=["heavy_ball", "num_lrc0_cosine", "num_lrc1_cosine", "num_lrc2_cosine"])
def test_readme_problem_trains(cfg, bound):
    x, y = S.data(torch.float32)
    start = S.full_loss(S.model(torch.float32), x, y)
    _, final = S.run_jax_native(autosgm_from_config(**cfg), README_STEPS, torch.float32)
    assert start > 13.0 and final <= bound, (start, final)


def test_readme_opt7_stays_finite_and_below_start():
    x, y = S.data(torch.float32)
    start = S.full_loss(S.model(torch.float32), x, y)
    cfg = dict(lr_cfg=(True, 1e-2, 3), beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True),
               rc_cfg=(1, 0, 0, 2, 1, 1, README_STEPS, 1, 0), wd_cfg=(0.0, 1), eps_cfg=(1e-10,))
    params, final = S.run_jax_native(autosgm_from_config(**cfg), README_STEPS, torch.float32)
    assert all(np.all(np.isfinite(v)) for v in params.values())
    assert final < start


# --------------------------------------------------------------------------------------------------
# API: state, validation, configuration tuples, masks, jit/inject
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_lrc, aoptlr, present", [
    (0, True, {"moment"}),
    (1, True, {"moment", "numerator", "wsq", "lr_num"}),
    (2, True, {"moment", "numerator", "wsq", "pcx", "lr_num"}),
    (3, True, {"moment", "numerator", "wsq", "lr_num"}),
    (4, True, {"moment", "huber_mean", "huber_var"}),
    (1, False, set()),
])
def test_state_fields(num_lrc, aoptlr, present):
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    state = autosgm(num_lrc=num_lrc, aoptlr=aoptlr).init(params)
    optional = {"moment", "numerator", "wsq", "pcx", "lr_num", "huber_mean", "huber_var"}
    assert {f for f in optional if getattr(state, f) is not None} == present
    assert state.count["w"].dtype == jnp.int32 and state.count["w"].shape == ()


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(beta_n=1.0), "beta_n"),
    (dict(beta_a=-0.1), "beta_a"),
    (dict(beta_i=1.0), "beta_i"),
    (dict(beta_i=0.5, gamma_i=0.5), "gamma_i"),
    (dict(gamma_i=-0.1), "gamma_i"),
    (dict(eta_i=-1.0), "eta_i"),
    (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(eps=-1.0), "eps"),
    (dict(aoptlr=4), "num_lrc=4"),
    (dict(num_lrc=5), "num_lrc"),
    (dict(wd_level=2), "wd_level"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        autosgm(**kwargs)


def test_config_tuples_map_to_keywords():
    cfg = config_from_tuples(lr_cfg=(True, 3e-3, 2), beta_cfg=(0.99, 0.98, 0.8, 0.1, 0.5, False),
                             rc_cfg=(2, 0, 0.1, 1, 1, 2, 10, 1, 0), wd_cfg=(1e-3, 1), eps_cfg=(1e-9,))
    window = cfg.pop("window")
    assert cfg == dict(learning_rate=3e-3, beta_n=0.99, beta_a=0.98, beta_i=0.8, gamma_i=0.1, eta_i=0.5,
                       weight_decay=1e-3, eps=1e-9, aoptlr=True, num_lrc=2, debias=False, wd_level=1,
                       maximize=False)
    np.testing.assert_allclose(np.asarray(window(jnp.arange(20))), 0.1 + 0.9 * (1 - np.arange(20) / 20), rtol=1e-6)
    assert config_from_tuples(rc_cfg=(0, 0, 0, 2, 1, 1, 1, 1, 0))["window"] is None
    with pytest.raises(ValueError, match="num_lrc=4"):
        config_from_tuples(lr_cfg=(4, 1e-3, 0))
    with pytest.warns(UserWarning, match="eps_cfg"):
        assert config_from_tuples(eps_cfg=(1e-10, True))["eps"] == 1e-10
    with pytest.raises(ValueError, match="rc_cfg"):
        config_from_tuples(rc_cfg=(1, 0, 0))


def test_params_required_when_needed():
    g = {"w": jnp.ones(3)}
    tx = autosgm(num_lrc=1)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, tx.init(g))
    tx = autosgm(num_lrc=0)
    u, _ = tx.update(g, tx.init(g))  # no weight decay, unit numerator: params are not needed
    assert np.all(np.asarray(u["w"]) < 0)


@pytest.mark.parametrize("num_lrc", [0, 1, 2, 3, 4])
def test_grad_mask_keeps_state_bit_identical(num_lrc):
    params = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.linspace(0.5, 1.0, 4)}
    grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
    tx = autosgm(1e-2, weight_decay=1e-2, num_lrc=num_lrc, window=autosgm_window(1, spe=10))
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    mask = {"a": jnp.asarray(True), "b": jnp.asarray(False)}
    updates, new = jax.jit(tx.update)(grads, state, params, grad_mask=mask)
    assert np.all(np.asarray(updates["b"]) == 0) and np.any(np.asarray(updates["a"]) != 0)
    for field, old_tree in zip(new._fields, state):
        if old_tree is None:
            continue
        new_tree = getattr(new, field)
        np.testing.assert_array_equal(np.asarray(new_tree["b"]), np.asarray(old_tree["b"]), err_msg=field)
    assert int(new.count["a"]) == 2 and int(new.count["b"]) == 1


def test_window_uses_each_tensors_own_count_and_matches_schedule():
    window = autosgm_window(1, n=2, spe=8)
    tx = autosgm(0.5, beta_i=0.0, aoptlr=False, window=window)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    grads = {"a": jnp.ones(2), "b": jnp.ones(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for k in range(10):
        mask = {"a": jnp.asarray(True), "b": jnp.asarray(k % 2 == 0)}
        updates, state = update(grads, state, params, grad_mask=mask)
        assert float(updates["a"][0]) == pytest.approx(-0.5 * float(np.float32(window(k))), rel=1e-6)
    assert int(state.count["b"]) == 5


STATIC = ("aoptlr", "num_lrc", "debias", "wd_level", "window", "maximize")


def test_inject_hyperparams_and_no_recompile():
    # float64 hyperparameters: a float32-traced β_n = 0.9999 would make 1 − β_n off by 1.6e-4 (relative)
    with jax.enable_x64(True):
        params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
        grads = jax.tree.map(lambda p: p - 0.5, params)
        make = optax.inject_hyperparams(scale_by_autosgm, static_args=STATIC, hyperparam_dtype=jnp.float64)
        tx = make(learning_rate=1e-2, weight_decay=1e-3, gamma_i=0.3, num_lrc=3, window=autosgm_window(2, spe=9))
        ref = autosgm(1e-2, weight_decay=1e-3, gamma_i=0.3, num_lrc=3, window=autosgm_window(2, spe=9))
        state, ref_state = tx.init(params), ref.init(params)
        traces = []

        def step(g, s, p):
            traces.append(1)
            return tx.update(g, s, p)

        step = jax.jit(step)
        for _ in range(3):
            updates, state = step(grads, state, params)
            ref_updates, ref_state = ref.update(grads, ref_state, params)
            for k in params:
                np.testing.assert_allclose(np.asarray(updates[k]), np.asarray(ref_updates[k]), rtol=1e-13)
        assert len(traces) == 1
        # a changed learning rate takes effect without recompiling (num_lrc=3: it enters the numerator estimate)
        state.hyperparams["learning_rate"] = jnp.asarray(2e-2, jnp.float64)
        doubled, _ = step(grads, state, params)
        same, _ = step(grads, state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(1e-2, jnp.float64)}),
                       params)
        assert len(traces) == 1
        assert np.all(np.abs(np.asarray(doubled["w"])) > 1.2 * np.abs(np.asarray(same["w"])))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("num_lrc", [0, 2, 4])
def test_dtype_stability(dtype, num_lrc):
    params = {"w": jnp.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4)}
    grads = {"w": jnp.linspace(0.5, -0.5, 12, dtype=dtype).reshape(3, 4)}
    tx = autosgm(1e-2, num_lrc=num_lrc, weight_decay=1e-2, window=autosgm_window(1, spe=5))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        updates, new_state = step(grads, state, params)
        assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)
        state = new_state
    assert updates["w"].dtype == dtype and np.all(np.isfinite(np.asarray(updates["w"], np.float32)))


def test_vmap_over_learning_rate():
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.ones(3)}
    make = optax.inject_hyperparams(scale_by_autosgm, static_args=STATIC)

    def one(lr):
        tx = make(learning_rate=lr, num_lrc=1)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates["w"]

    out = jax.vmap(one)(jnp.asarray([1e-2, 2e-2]))
    np.testing.assert_allclose(np.asarray(out[1]), 2 * np.asarray(out[0]), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# float16 (issue 15.5): ε rounds to 0 there and the moment underflows
# --------------------------------------------------------------------------------------------------


def _run_float16(tx, grad, steps=3):
    params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.float16)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    start = params
    for _ in range(steps):
        updates, state = step({"w": jnp.full(6, grad, jnp.float16)}, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(start["w"], np.float32), np.asarray(params["w"], np.float32)


@pytest.mark.parametrize("name", ["autosgm_adam", "autosgm_parcor"])
def test_float16_zero_gradients_keep_parameters(name):
    # ε = 1e-8 / 1e-10 is 0 in float16: the step was 0/0 (NaN parameters after the first step)
    from jaxopt_suite import registry

    start, end = _run_float16(registry.get(name).build(learning_rate=1e-2), 0.0)
    np.testing.assert_array_equal(end, start)


@pytest.mark.parametrize("name", ["autosgm_adam", "autosgm_parcor"])
def test_float16_small_gradients_stay_finite(name):
    # g = 1e-3: (1 − β_a)·g² = 1e-9 underflows to 0 in float16, so d = ε (was 0: m/0 = −inf parameters).
    # With ε raised to 2⁻¹⁴ each step is at most α·|m|/ε ≤ (α0·κ)·|g|·2¹⁴ with κ = 1 + EMA(w²) ≤ 2 (the
    # parcor trust region; α = α0 for num_lrc 0), i.e. ≤ 0.33 for α0 = 1e-2, plus float16 rounding (2⁻¹¹).
    from jaxopt_suite import registry

    start, end = _run_float16(registry.get(name).build(learning_rate=1e-2), 1e-3)
    assert np.all(np.isfinite(end))
    assert np.max(np.abs(end - start)) <= 3 * (2 * 1e-2 * 1e-3 * 2**14) * (1 + 2**-10)
    assert np.all(end <= start)  # a positive gradient moves every parameter down (or leaves it)


def test_float16_debias_factor_beyond_float16_range():
    # β_a = 0.99999: 1/(1 − β_a) = 1e5 > 65504 was inf in float16 and q·inf gave NaN or inf
    tx = autosgm(1e-2, beta_a=0.99999, eps=1e-8)
    start, end = _run_float16(tx, 1e-2)
    assert np.all(np.isfinite(end)) and np.all(end < start)
    _, still = _run_float16(tx, 0.0)
    np.testing.assert_array_equal(still, start)


def test_float16_eps_floor_leaves_other_dtypes_alone():
    from jaxopt_suite.autosgm.autosgm import _eps_in

    for dtype in (jnp.float32, jnp.bfloat16):
        assert _eps_in(dtype, 1e-10) == jnp.asarray(1e-10, dtype)
    assert _eps_in(jnp.float16, 1e-10) == jnp.finfo(jnp.float16).tiny
    assert _eps_in(jnp.float16, 1e-3) == jnp.asarray(1e-3, jnp.float16)
    assert _eps_in(jnp.float16, 0.0) == 0  # ε = 0 (the exact Adam reduction) stays 0
    with jax.enable_x64(True):
        assert _eps_in(jnp.float64, 1e-10) == 1e-10
