"""EnhancedSGD (jaxopt_suite/enhanced_sgd): exactness of the blocks, behaviour and stability."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import contextlib

import jaxopt_suite
from jaxopt_suite.enhanced_sgd import entropy as E
from jaxopt_suite.enhanced_sgd import qlearning as Q
from jaxopt_suite.enhanced_sgd import transform as T
from jaxopt_suite.enhanced_sgd import (
    bayesian_initialize,
    enhanced_sgd,
    gradient_entropy,
    scale_by_enhanced_sgd,
    update_mix_prob,
)

try:  # the suite's lookahead wrapper (composition target of enhanced_sgd)
    from jaxopt_suite.lookahead import lookahead
except ImportError:  # pragma: no cover - depends on the checkout
    lookahead = None

needs_lookahead = pytest.mark.skipif(lookahead is None, reason="jaxopt_suite.lookahead is not available")


# --------------------------------------------------------------------------------------------------
# the README problem: Linear(10, 50) - ReLU - Linear(50, out), MSE, X ~ N(0, 1) 1024x10, batch 64
# --------------------------------------------------------------------------------------------------


def readme_problem(seed: int, out: int = 1, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(k[0], (1024, 10), jnp.float32)
    w_true = jax.random.normal(k[1], (10, out), jnp.float32)
    y = x @ w_true + 0.1 * jax.random.normal(k[2], (1024, out), jnp.float32)
    bound1, bound2 = 1 / math.sqrt(10), 1 / math.sqrt(50)  # torch's default Linear init ranges
    params = {
        "w1": jax.random.uniform(k[3], (50, 10), jnp.float32, -bound1, bound1),
        "b1": jax.random.uniform(k[4], (50,), jnp.float32, -bound1, bound1),
        "w2": jax.random.uniform(k[5], (out, 50), jnp.float32, -bound2, bound2),
        "b2": jnp.zeros((out,), jnp.float32) + 0.01,
    }
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    return params, x.astype(dtype), y.astype(dtype)


def mlp_loss(params, x, y):
    h = jax.nn.relu(x @ params["w1"].T + params["b1"])
    return jnp.mean(jnp.square(h @ params["w2"].T + params["b2"] - y))


def batch(x, y, i, size=64):
    start = (i * size) % x.shape[0]
    return jax.lax.dynamic_slice_in_dim(x, start, size), jax.lax.dynamic_slice_in_dim(y, start, size)


def train(opt, params, x, y, steps, *, with_value=True, loss_scale=1.0):
    """``steps`` jitted steps on cycling batches; returns the final params, state and per-step records."""

    def body(carry, i):
        p, s = carry
        xb, yb = batch(x, y, i)
        loss, g = jax.value_and_grad(lambda q: loss_scale * mlp_loss(q, xb, yb))(p)
        extra = {"value": loss} if with_value else {}
        u, s = opt.update(g, s, p, **extra)
        return (optax.apply_updates(p, u), s), (loss, p)

    state = opt.init(params)
    (params, state), (losses, path) = jax.lax.scan(body, (params, state), jnp.arange(steps))
    return params, state, losses, path


# --------------------------------------------------------------------------------------------------
# Q-learning blocks
# --------------------------------------------------------------------------------------------------


def test_q_update_matches_hand_computed_watkins_update():
    q = jnp.zeros((27, 18)).at[5, 17].set(2.0).at[3, 4].set(1.0)
    new = Q.q_learning_update(q, 3, 4, 0.5, 5, 0.1, 0.9)
    # 1 + 0.1 (0.5 + 0.9·2 − 1) = 1.13
    np.testing.assert_allclose(new[3, 4], 1.13, rtol=1e-6)
    untouched = np.ones((27, 18), bool)
    untouched[3, 4] = False
    np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(q)[untouched])
    # self-loop: Q[3, 4] = 1 is the row maximum: 1 + 0.1 (0.5 + 0.9·1 − 1) = 1.04
    q2 = jnp.zeros((27, 18)).at[3, 4].set(1.0)
    np.testing.assert_allclose(Q.q_learning_update(q2, 3, 4, 0.5, 3, 0.1, 0.9)[3, 4], 1.04, rtol=1e-6)


def test_epsilon_greedy_cases():
    key = jax.random.PRNGKey(3)
    row = jnp.zeros(18).at[7].set(0.3).at[12].set(0.3)
    assert int(Q.epsilon_greedy(key, row, 0.0, 0.5)) == 7  # greedy: first maximum
    assert int(Q.epsilon_greedy(key, jnp.zeros(18), 0.0, 0.5)) == 0  # unseen state: the no-op
    keys = jax.random.split(key, 500)
    mult = jax.vmap(lambda k: Q.epsilon_greedy(k, row, 1.0, 1.0))(keys)
    add = jax.vmap(lambda k: Q.epsilon_greedy(k, row, 1.0, 0.0))(keys)
    assert set(np.asarray(mult).tolist()) == set(range(9))
    assert set(np.asarray(add).tolist()) == set(range(9, 18))
    assert int(Q.epsilon_greedy(key, row, 0.7, 0.5)) == int(Q.epsilon_greedy(key, row, 0.7, 0.5))


def test_epsilon_greedy_exploration_rate():
    eps, n = 0.3, 10_000
    row = jnp.zeros(18).at[4].set(1.0)
    actions = np.asarray(jax.vmap(lambda k: Q.epsilon_greedy(k, row, eps, 0.5))(jax.random.split(jax.random.PRNGKey(0), n)))
    # exploration picks action 4 with probability 1/18 too; count draws that were not the greedy action
    rate = np.mean(actions != 4) / (1 - 1 / 18)
    assert abs(rate - eps) <= 4 * math.sqrt(eps * (1 - eps) / n)


def test_apply_action():
    one = jnp.ones(())
    lr, m = Q.apply_action(0, one, one)
    assert (float(lr), float(m)) == (1.0, 1.0)
    lr, m = Q.apply_action(1, one, one)
    np.testing.assert_allclose([lr, m], [1.0, 0.95], rtol=1e-7)
    lr, m = Q.apply_action(14, one, one)
    np.testing.assert_allclose([lr, m], [0.995, 1.005], rtol=1e-7)
    lr, m = Q.apply_action(7, 1.45 * one, one)  # lr ×1.05 → clipped at 1.5; momentum ×0.95
    np.testing.assert_allclose([lr, m], [1.5, 0.95], rtol=1e-7)
    lr, m = Q.apply_action(3, 0.5 * one, 0.9 * one)  # lr ×0.95 → clipped at the lower bound
    np.testing.assert_allclose([lr, m], [0.5, 0.9], rtol=1e-7)
    lr, m = Q.apply_action(1, one, one, adaptive_momentum=False)
    np.testing.assert_allclose([lr, m], [1.0, 1.0])


def test_discretize_thresholds():
    def s(loss=1.0, prev=1.0, hist=True, v=1.0, pv=1.0, h=0.5, hbar=0.5):
        return int(Q.discretize(jnp.float32(loss), jnp.float32(prev), hist, jnp.float32(v), jnp.float32(pv),
                                jnp.float32(h), jnp.float32(hbar)))

    assert s() == 9 + 3 + 1
    assert s(loss=0.98) == 0 + 3 + 1 and s(loss=0.995) == 13 and s(loss=1.02) == 18 + 3 + 1
    assert s(loss=1.005) == 13
    assert s(loss=-1.02, prev=-1.0) == 0 + 3 + 1  # relative to |prev|: a lower loss is "falling"
    assert s(loss=5.0, hist=False) == 13  # no history: level
    assert s(v=0.94) == 9 + 0 + 1 and s(v=0.96) == 13 and s(v=1.06) == 9 + 6 + 1 and s(v=1.04) == 13
    assert s(v=5.0, pv=0.0) == 13  # no previous variance: level
    assert s(h=0.47) == 9 + 3 + 0 and s(h=0.49) == 13 and s(h=0.53) == 9 + 3 + 2 and s(h=0.51) == 13


def test_reward_formula():
    r = Q.transition_reward(2.0, 1.5, 0.4, 0.5, 1.0, 1.2, 0.1)
    np.testing.assert_allclose(r, 0.25 - 0.1 * (0.1 + 0.2), rtol=1e-6)
    r = Q.transition_reward(1.0, 9.0, 0.4, 0.4, 1.0, 5.0, 0.1)  # both terms saturate
    np.testing.assert_allclose(r, -1.0 - 0.1, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------------------


def numpy_entropy(x, bins=100):
    """Reference: NumPy histogram of probabilities over [min, max]."""
    counts, _ = np.histogram(np.asarray(x, np.float64).ravel(), bins=bins)
    p = counts[counts > 0] / counts.sum()
    h = -np.sum(p * np.log(p))
    return h, h / np.log(bins)


def test_entropy_known_values():
    h, hn = gradient_entropy(jnp.full((7, 3), 0.25))
    assert float(h) == 0.0 and float(hn) == 0.0
    h, hn = gradient_entropy(jnp.concatenate([jnp.zeros(500), jnp.ones(500)]))
    np.testing.assert_allclose([h, hn], [math.log(2), 0.150515], rtol=1e-5)
    h, hn = gradient_entropy(jnp.asarray([0.0, 0.0, 0.0, 1.0]))
    np.testing.assert_allclose([h, hn], [0.562335, 0.122110], rtol=1e-5)
    _, hn = gradient_entropy(jnp.arange(100.0))
    np.testing.assert_allclose(hn, 1.0, atol=1e-6)


def test_entropy_matches_numpy_histogram():
    x = np.random.default_rng(0).standard_normal(20_000).astype(np.float32)
    # bin indices as the spec states them, restated in NumPy
    lo, hi = x.min(), x.max()
    idx = np.clip(np.floor((x - lo) * np.float32(100 / np.float32(hi - lo))), 0, 99).astype(int)
    ours = E.histogram_counts([jnp.asarray(x)], 100, jnp.float32(lo), jnp.float32(hi))
    np.testing.assert_array_equal(np.asarray(ours), np.bincount(idx, minlength=100))
    h, hn = gradient_entropy(jnp.asarray(x))
    ref_h, ref_hn = numpy_entropy(x)
    np.testing.assert_allclose([h, hn], [ref_h, ref_hn], rtol=1e-4)


def test_entropy_scale_invariance_and_leaf_splits():
    x = jax.random.normal(jax.random.PRNGKey(1), (100_000,))
    h0 = gradient_entropy(x)
    for k in (-10, 3):
        hk = gradient_entropy(x * 2.0**k)
        assert float(hk[0]) == float(h0[0]) and float(hk[1]) == float(h0[1])
    np.testing.assert_allclose(gradient_entropy(3.7 * x)[0], h0[0], atol=1e-3)
    split_a = {"a": x[:10].reshape(2, 5), "b": x[10:60_000], "c": x[60_000:]}
    split_b = [x[:99_999], x[99_999:]]
    lo, hi = E.value_range([x])
    base = E.histogram_counts([x], 100, lo, hi)
    for tree in (split_a, split_b):
        leaves = jax.tree.leaves(tree)
        np.testing.assert_array_equal(E.histogram_counts(leaves, 100, *E.value_range(leaves)), base)
        assert float(gradient_entropy(tree)[0]) == float(h0[0])


# --------------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------------


def test_gaussian_noise_distribution():
    """The counter-hash + inverse-CDF generator gives N(0, 1) samples (KS, moments, independence)."""
    n = 100_000
    key = jax.random.PRNGKey(7)
    xi = np.asarray(T.gaussian_noise(key, (n,)), np.float64)
    assert abs(xi.mean()) < 4 / math.sqrt(n)
    assert abs(xi.std() - 1) < 4 * math.sqrt(0.5 / n)
    assert abs(np.mean(xi**4) - 3) < 0.1  # Gaussian kurtosis
    srt = np.sort(xi)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(srt / math.sqrt(2)))
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.63 / math.sqrt(n)  # 1% critical value of the KS statistic
    other = np.asarray(T.gaussian_noise(jax.random.fold_in(key, 1), (n,)), np.float64)
    assert abs(np.corrcoef(xi, other)[0, 1]) < 4 / math.sqrt(n)
    assert abs(np.corrcoef(xi[:-1], xi[1:])[0, 1]) < 4 / math.sqrt(n)
    np.testing.assert_array_equal(T.gaussian_noise(key, (n,)), xi.astype(np.float32))
    assert T.gaussian_noise(key, (3, 4), jnp.bfloat16).dtype == jnp.bfloat16


def test_noise_is_finite_and_symmetric_at_the_extreme_bit_patterns():
    """Every 32-bit pattern maps to a finite sample: the top grid point once rounded to u = 1 (ξ = +inf)."""
    top = jnp.array([0xFFFFFF00, 0xFFFFFFFF], jnp.uint32)  # h >> 8 = 2²⁴ − 1
    bottom = jnp.array([0x00000000, 0x000000FF], jnp.uint32)  # h >> 8 = 0
    hi, lo = np.asarray(T.normal_from_bits(top)), np.asarray(T.normal_from_bits(bottom))
    assert np.all(np.isfinite(hi)) and np.all(np.isfinite(lo))
    np.testing.assert_array_equal(hi, -lo)  # the grid is symmetric about 0
    assert 5.0 < hi[0] < 5.6
    # the midpoints around 0 are ±2⁻²⁴·√(π/2), not 0
    mid = np.asarray(T.normal_from_bits(jnp.array([0x7FFFFF00, 0x80000000], jnp.uint32)), np.float64)
    np.testing.assert_allclose(mid, np.array([-1.0, 1.0]) * 2.0**-24 * math.sqrt(math.pi / 2), rtol=1e-4)


def test_noise_is_applied_with_the_scale():
    g = {"w": jnp.zeros((40, 50))}
    opt = scale_by_enhanced_sgd(1.0, 0.0, noise_scale=0.5, gradient_retention=False, gradient_clipping=False,
                                gradient_centering=False)
    u, _ = opt.update(g, opt.init(g))
    np.testing.assert_allclose(np.std(np.asarray(u["w"])), 0.5, rtol=0.05)


# --------------------------------------------------------------------------------------------------
# the minimal path against the explicit formulas
# --------------------------------------------------------------------------------------------------


class MinimalReference:
    """Explicit formulas: variance → smoothed, stabilised gv → clip level; centre, clip, momentum."""

    def __init__(self, params, lr, beta, sf, dtype):
        self.names = sorted(params)
        self.dtype, self.lr, self.beta, self.sf = dtype, lr, beta, sf
        self.p = {k: np.asarray(params[k], dtype) for k in self.names}
        self.buf = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.gv = 0.0
        self.engaged = {"stabiliser": 0, "clip": 0}

    def step(self, grads):
        dtype, names = self.dtype, self.names
        g = {k: np.asarray(grads[k], dtype) for k in names}
        v = float(np.var(np.concatenate([g[k].ravel() for k in names]).astype(np.float64), ddof=1))
        gv = self.sf * v + (1 - self.sf) * self.gv
        if abs(gv) > 0.9:  # the previous valued variance is 0 (no loss is ever given)
            gv = (1 - 0.9) * gv
            self.engaged["stabiliser"] += 1
        c = min(max(2 * math.sqrt(gv), 0.5), 10.0)
        for k in names:
            x = g[k] - g[k].mean(dtype=np.float64).astype(dtype) if g[k].size > 1 else g[k]
            if gv > 0:
                self.engaged["clip"] += int(np.any(np.abs(x) > c))
                x = np.clip(x, dtype(-c), dtype(c))
            self.buf[k] = (dtype(self.beta) * self.buf[k] + x).astype(dtype)
            self.p[k] = (self.p[k] - dtype(self.lr) * self.buf[k]).astype(dtype)
        self.gv = gv


# float32 at loss scale 1 and float64 at 100 in the default suite (each dtype and each scale once; a
# compile of about 8 s each), the other two with -m slow
@pytest.mark.parametrize("precision, loss_scale", [
    ("float32", 1.0), ("float64", 100.0),
    pytest.param("float32", 100.0, marks=pytest.mark.slow), pytest.param("float64", 1.0, marks=pytest.mark.slow)])
def test_minimal_path_equals_explicit_formulas(precision, loss_scale):
    """Controller, noise, retention and lookahead off, centering 'all', no loss: the explicit formulas.

    With the plain loss both trajectories run freely; with the loss ×100 (variance above the stabiliser's
    threshold, clipping active) the gradients are teacher-forced (taken at the reference's parameters),
    since the large steps would otherwise amplify rounding differences chaotically.
    """
    steps, beta, sf = 200, 0.9, 0.1
    lr = 0.01 if loss_scale == 1.0 else 0.001
    ctx = jax.enable_x64(True) if precision == "float64" else contextlib.nullcontext()
    with ctx:
        dtype = jnp.float64 if precision == "float64" else jnp.float32
        params, x, y = readme_problem(0, out=2, dtype=dtype)
        grad = jax.jit(jax.grad(lambda p, xb, yb: loss_scale * mlp_loss(p, xb, yb)))
        opt = scale_by_enhanced_sgd(lr, beta, sf, apply_noise=False, gradient_retention=False,
                                    gradient_centering="all", gradient_clipping=True)
        @jax.jit
        def update(g, s, p):
            u, s = opt.update(g, s)
            return optax.apply_updates(p, u), s

        ref = MinimalReference(params, lr, beta, sf, np.dtype(precision).type)
        ours, state = params, opt.init(params)
        err = scale = 0.0
        for i in range(steps):
            xb, yb = batch(x, y, i)
            g_ref = grad({k: jnp.asarray(v) for k, v in ref.p.items()}, xb, yb)
            g_ours = g_ref if loss_scale != 1.0 else grad(ours, xb, yb)
            ours, state = update(g_ours, state, ours)
            ref.step(g_ref)
            err = max(err, max(float(np.max(np.abs(np.asarray(ours[k]) - ref.p[k]))) for k in ref.names))
            scale = max(scale, max(float(np.max(np.abs(ref.p[k]))) for k in ref.names))
    tol = 1e-6 if precision == "float32" else 1e-10
    assert err / scale <= tol, err / scale
    if loss_scale == 100.0:
        assert ref.engaged["stabiliser"] > 0 and ref.engaged["clip"] > 0, ref.engaged


# --------------------------------------------------------------------------------------------------
# centering, retention, spikes, skipping
# --------------------------------------------------------------------------------------------------


def _one_update(grads, **kwargs):
    opts = dict(apply_noise=False, gradient_retention=False, gradient_clipping=False)
    opts.update(kwargs)
    opt = scale_by_enhanced_sgd(1.0, 0.0, **opts)
    u, _ = opt.update(grads, opt.init(grads))
    return jax.tree.map(lambda v: -v, u)


def test_centering_modes():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    g = {"w": jax.random.normal(k[0], (6, 5)) + 3, "conv": jax.random.normal(k[1], (4, 3, 2)) - 1,
         "b": jax.random.normal(k[2], (6,)) + 2, "s": jnp.full((1,), 5.0)}
    out = _one_update(g, gradient_centering=True)
    np.testing.assert_allclose(np.mean(out["w"], axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(np.mean(out["conv"], axis=(1, 2)), 0, atol=1e-6)
    np.testing.assert_array_equal(out["b"], g["b"])
    np.testing.assert_array_equal(out["s"], g["s"])
    flax_axis = _one_update(g, gradient_centering=True, centering_axis=-1)
    np.testing.assert_allclose(np.mean(flax_axis["w"], axis=0), 0, atol=1e-6)
    out = _one_update(g, gradient_centering="all")
    for name in ("w", "conv", "b"):
        np.testing.assert_allclose(np.mean(out[name]), 0, atol=1e-6)
    np.testing.assert_array_equal(out["s"], g["s"])
    np.testing.assert_array_equal(_one_update(g, gradient_centering=False)["w"], g["w"])


def test_retention_weight_zero_equals_no_retention():
    params, x, y = readme_problem(1)
    common = dict(apply_noise=True, seed=4)
    p0, *_ = train(scale_by_enhanced_sgd(retention_weight=0.0, **common), params, x, y, 60)
    p1, *_ = train(scale_by_enhanced_sgd(gradient_retention=False, **common), params, x, y, 60)
    jax.tree.map(np.testing.assert_array_equal, p0, p1)
    p2, s2, *_ = train(scale_by_enhanced_sgd(retention_weight=0.5, **common), params, x, y, 60)
    assert not np.array_equal(p2["w1"], p0["w1"])
    assert int(s2.retained_count) > 0
    trees = [leaf for leaf in (s2.momentum_buffer, s2.retained) if leaf is not None]
    assert len(trees) == 2  # at most momentum and retained in the inner state


def test_retention_blend_formula():
    g1 = {"w": jnp.asarray([1.0, -2.0])}
    g2 = {"w": jnp.asarray([3.0, 1.0])}
    opt = scale_by_enhanced_sgd(1.0, 0.0, retention_weight=0.25, gradient_buffer_size=4, apply_noise=False,
                                gradient_clipping=False, gradient_centering=False)
    s = opt.init(g1)
    _, s = opt.update(g1, s)  # count 0 always inserts: R = 0.25 g1, n = 1
    np.testing.assert_allclose(s.retained["w"], 0.25 * g1["w"])
    u, s = opt.update(g2, s)
    expected = 0.75 * g2["w"] + 0.25 * (0.25 * g1["w"]) / (1 - 0.75)
    np.testing.assert_allclose(-u["w"], expected, rtol=1e-6)


def _controller_run(losses, **kwargs):
    g = {"w": jnp.asarray([[0.3, -0.1], [0.2, 0.05]])}
    opt = scale_by_enhanced_sgd(0.1, 0.9, apply_noise=False, **kwargs)
    state = opt.init(g)
    update = jax.jit(lambda s, f: opt.update(g, s, value=f))
    states = []
    for f in losses:
        _, state = update(state, jnp.float32(f))
        states.append(state)
    return states


def test_spike_cuts_lr_and_momentum_then_recovers():
    states = _controller_run([1, 1, 1, 1, 10] + [1] * 12, loss_correction_factor=0.5, spike_recovery_steps=10)
    assert not any(bool(s.last_spike) for s in states[:4])
    spike = states[4]
    assert bool(spike.last_spike)
    np.testing.assert_allclose(spike.last_lr, 0.5 * 0.1 * spike.lr_scale, rtol=1e-6)
    np.testing.assert_allclose(spike.last_momentum, min(0.9 * spike.momentum_scale * 0.9, 0.99), rtol=1e-6)
    for j, s in enumerate(states[5:15], start=1):
        k = max(0.0, 1 - j / 10)
        np.testing.assert_allclose(s.spike_level, k, atol=1e-6)
        np.testing.assert_allclose(s.last_lr, 0.1 * s.lr_scale * (1 - 0.5 * k), rtol=1e-5)
    assert float(states[-1].spike_level) == 0.0


def test_negative_constant_losses_never_spike():
    states = _controller_run([-1.0] * 12)
    assert not any(bool(s.last_spike) for s in states)


def test_epsilon_decays_per_valued_step():
    states = _controller_run([1.0] * 30, q_epsilon=0.5, q_epsilon_decay=0.9, q_epsilon_min=0.05)
    for n, s in enumerate(states, start=1):
        np.testing.assert_allclose(s.epsilon, max(0.05, 0.5 * 0.9**n), rtol=1e-5)


def test_scales_stay_within_bounds_and_effective_values_bounded():
    states = _controller_run(list(np.random.default_rng(0).uniform(0.5, 3, 200)), q_epsilon=1.0, q_epsilon_decay=1.0)
    lr = np.array([float(s.last_lr) for s in states])
    mom = np.array([float(s.last_momentum) for s in states])
    scales = np.array([[float(s.lr_scale), float(s.momentum_scale)] for s in states])
    f32 = np.float32
    assert np.all((scales[:, 0] >= f32(0.5)) & (scales[:, 0] <= f32(1.5)))
    assert np.all((scales[:, 1] >= f32(0.9)) & (scales[:, 1] <= f32(1.1)))
    assert np.all((lr >= 0.5 * 0.5 * 0.1 * (1 - 1e-6)) & (lr <= 1.5 * 0.1 * (1 + 1e-6)))
    assert np.all(mom <= 0.99 + 1e-7)
    assert len(set(np.round(scales[:, 0], 6))) > 5  # the controller moved the scale


def test_q_table_learns_from_valued_steps():
    states = _controller_run(list(np.linspace(2.0, 1.0, 20)))
    assert bool(states[-1].has_prev)
    assert float(jnp.max(jnp.abs(states[-1].q_table))) > 0


@pytest.mark.parametrize("where", ["grad", "value"])
def test_non_finite_step_is_skipped(where):
    params, x, y = readme_problem(0)
    opt = scale_by_enhanced_sgd()
    g = jax.grad(mlp_loss)(params, x[:64], y[:64])
    state = opt.init(params)
    _, state = opt.update(g, state, params, value=jnp.float32(1.0))
    if where == "grad":
        bad, value = jax.tree.map(lambda v: v.at[(0,) * v.ndim].set(jnp.nan), g), jnp.float32(1.0)
    else:
        bad, value = g, jnp.float32(jnp.inf)
    u, new = jax.jit(lambda gg, s, v: opt.update(gg, s, params, value=v))(bad, state, value)
    jax.tree.map(lambda leaf: np.testing.assert_array_equal(leaf, 0), u)
    assert int(new.skipped) == 1
    same = new._replace(skipped=state.skipped)
    jax.tree.map(np.testing.assert_array_equal, same, state)


@needs_lookahead
@pytest.mark.parametrize("where", ["grad", "value"])
def test_non_finite_sync_step_is_skipped_by_lookahead(where):
    # issue 15.5: the inner step was skipped but lookahead still synchronised (params and slow weights moved)
    from jaxopt_suite.lookahead import LookaheadState

    params, x, y = readme_problem(0)
    opt = enhanced_sgd(lookahead_k=3, seed=1)
    step = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v))
    state = opt.init(params)
    for i in range(2):
        f, g = jax.value_and_grad(mlp_loss)(params, *batch(x, y, i))
        u, state = step(g, state, params, f)
        params = optax.apply_updates(params, u)
    assert int(state.count) == 2  # the next step is a synchronisation
    f, g = jax.value_and_grad(mlp_loss)(params, *batch(x, y, 2))
    if where == "grad":
        bad, value = jax.tree.map(lambda v: v.at[(0,) * v.ndim].set(jnp.nan), g), f
    else:
        bad, value = g, jnp.float32(jnp.nan)
    u, skipped = step(bad, state, params, value)
    jax.tree.map(lambda leaf: np.testing.assert_array_equal(leaf, 0), u)
    assert isinstance(skipped, LookaheadState) and int(skipped.count) == 2
    jax.tree.map(np.testing.assert_array_equal, skipped.slow, state.slow)
    assert int(skipped.inner_state.skipped) == 1
    same = skipped.inner_state._replace(skipped=state.inner_state.skipped)
    jax.tree.map(np.testing.assert_array_equal, same, state.inner_state)
    # the next finite step is the synchronisation: fast == slow afterwards
    u, synced = step(g, skipped, params, f)
    params = optax.apply_updates(params, u)
    assert int(synced.count) == 0
    jax.tree.map(np.testing.assert_array_equal, params, synced.slow)


@pytest.mark.parametrize("x64", [False, True], ids=["f32_control", "f64_control"])
def test_huge_gradient_element_keeps_statistics_finite(x64):
    # issue 15.5: one 1e20 element squared to inf in float32: grad_var inf, then the Q-table NaN for good
    with jax.enable_x64(x64):
        params, x, y = readme_problem(0)
        opt = enhanced_sgd(seed=2)
        step = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v))
        state = opt.init(params)
        for i in range(20):
            f, g = jax.value_and_grad(mlp_loss)(params, *batch(x, y, i))
            if i == 2:
                g = {**g, "w1": g["w1"].at[3, 4].set(1e20)}
            u, state = step(g, state, params, f)
            params = optax.apply_updates(params, u)
            inner = state.inner_state
            assert np.isfinite(float(inner.grad_var)) and np.isfinite(float(inner.prev_grad_var)), i
            assert np.all(np.isfinite(np.asarray(inner.q_table))), i
            assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params)), i
        # saturated: the variance is held at float32's maximum (the leaves' dtype), not inf
        assert int(inner.skipped) == 0


@pytest.mark.parametrize("x64", [False, True], ids=["f32_control", "f64_control"])
def test_scaled_variance_is_exact(x64):
    # gradients ≥ 2³² take the scaled variance pass: multiplying every gradient by 2⁴⁰ multiplies the variance
    # (hence gv after one step, here 0.1·v + 0.9·0) by exactly 2⁸⁰; below 2³² the pass is the plain one
    with jax.enable_x64(x64):
        params, x, y = readme_problem(0)
        g = jax.grad(mlp_loss)(params, x[:64], y[:64])
        # large enough that both runs take the stabiliser's branch (gv after it > 0.9 implies that branch)
        g = jax.tree.map(lambda v: 100.0 * v, g)
        opt = scale_by_enhanced_sgd(apply_noise=False)
        state = opt.init(params)
        _, small = opt.update(g, state, params, value=jnp.float32(1.0))
        _, large = opt.update(jax.tree.map(lambda v: v * 2.0**40, g), state, params, value=jnp.float32(1.0))
        assert float(small.grad_var) > 0.9
        assert float(large.grad_var) == float(small.grad_var) * 2.0**80
    assert T._variance_scale(jnp.float32(-3.0), jnp.float32(2.0**31)) == (1.0, 1.0)  # below 2³²: plain
    scale, inverse = T._variance_scale(jnp.float32(-1e20), jnp.float32(5.0))
    assert float(scale) == 2.0**66 and float(inverse) == 2.0**-66
    scale, inverse = T._variance_scale(jnp.float32(0.0), jnp.float32(3e38))
    assert float(scale) == 2.0**126 and float(inverse) == 2.0**-126


def test_grad_mask_freezes_masked_leaves():
    params, x, y = readme_problem(0)
    opt = scale_by_enhanced_sgd()
    g = jax.grad(mlp_loss)(params, x[:64], y[:64])
    state = opt.init(params)
    _, state = opt.update(g, state, params, value=jnp.float32(1.0))
    mask = {"w1": True, "b1": False, "w2": True, "b2": False}
    u, new = opt.update(g, state, params, value=jnp.float32(0.9), grad_mask=mask)
    for name in ("b1", "b2"):
        np.testing.assert_array_equal(u[name], 0)
        np.testing.assert_array_equal(new.momentum_buffer[name], state.momentum_buffer[name])
        np.testing.assert_array_equal(new.retained[name], state.retained[name])
    assert np.any(np.asarray(u["w1"]) != 0)
    # masked leaves are left out of the statistics: NaN there does not skip the step
    bad = dict(g, b1=jnp.full_like(g["b1"], jnp.nan))
    u2, new2 = opt.update(bad, state, params, value=jnp.float32(0.9), grad_mask=mask)
    assert int(new2.skipped) == 0
    np.testing.assert_array_equal(u2["w1"], u["w1"])


def test_single_element_gradient_has_zero_variance():
    opt = scale_by_enhanced_sgd(apply_noise=False)
    g = jnp.asarray([2.0])
    _, s = opt.update(g, opt.init(g))
    assert float(s.grad_var) == 0.0 and int(s.skipped) == 0


def test_per_leaf_learning_rates():
    params, x, y = readme_problem(0)
    g = jax.grad(mlp_loss)(params, x[:64], y[:64])
    kw = dict(apply_noise=False)
    ref, _ = scale_by_enhanced_sgd(0.05, 0.9, **kw).update(g, scale_by_enhanced_sgd(**kw).init(params))
    lrs = {"w1": 0.05, "b1": 0.1, "w2": 0.05, "b2": 0.2}
    opt = scale_by_enhanced_sgd(lrs, {"w1": 0.9, "b1": 0.5, "w2": 0.9, "b2": 0.9}, **kw)
    u, _ = opt.update(g, opt.init(params))
    np.testing.assert_allclose(u["w1"], ref["w1"], rtol=1e-6)
    np.testing.assert_allclose(u["b1"], 2 * ref["b1"], rtol=1e-6)
    np.testing.assert_allclose(u["b2"], 4 * ref["b2"], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# user-invoked helpers and initialisation
# --------------------------------------------------------------------------------------------------


def test_update_mix_prob_rule():
    opt = scale_by_enhanced_sgd(q_initial_mix_prob=0.8)
    s = opt.init({"w": jnp.zeros(3)})
    s = update_mix_prob(s, 1.0)  # first call stores the loss
    assert float(s.mix_prob) == pytest.approx(0.8) and float(s.mix_prev_loss) == 1.0
    s = update_mix_prob(s, 1.005)  # change < 0.01 → ×0.98
    np.testing.assert_allclose(s.mix_prob, 0.8 * 0.98, rtol=1e-6)
    s = update_mix_prob(s, 2.0)  # change ≥ 0.01 → ×(1 + 0.05·0.98), capped at 0.8
    np.testing.assert_allclose(s.mix_prob, min(0.8, 0.8 * 0.98 * 1.049), rtol=1e-6)
    for _ in range(200):
        s = update_mix_prob(s, 2.0)
    np.testing.assert_allclose(s.mix_prob, 0.1, rtol=1e-6)  # floor
    wrapped = optax.chain(optax.identity(), opt)
    ws = update_mix_prob(wrapped.init({"w": jnp.zeros(3)}), 3.0)
    assert float(ws[1].mix_prev_loss) == 3.0


def test_bayesian_initialization():
    g = {"w": jnp.zeros(3)}
    s = scale_by_enhanced_sgd(bayesian_init=True, bayesian_prior_std=0.05, seed=11).init(g)
    z = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(11), 1), (2,), jnp.float32)
    np.testing.assert_allclose([s.lr_scale, s.momentum_scale],
                               [np.clip(1 + 0.05 * z[0], 0.5, 1.5), np.clip(1 + 0.05 * z[1], 0.9, 1.1)], rtol=1e-6)
    s0 = scale_by_enhanced_sgd(bayesian_init=True, adaptive_momentum=False, seed=11).init(g)
    assert float(s0.momentum_scale) == 1.0
    key = jax.random.PRNGKey(5)
    s2 = bayesian_initialize(s, key, prior_std=10.0)
    z2 = jax.random.normal(key, (2,), jnp.float32)
    np.testing.assert_allclose([s2.lr_scale, s2.momentum_scale],
                               [np.clip(s.lr_scale + 10 * z2[0], 0.5, 1.5), np.clip(s.momentum_scale + 10 * z2[1], 0.9, 1.1)])
    s3 = bayesian_initialize(s)  # key from the state, which advances
    assert not np.array_equal(s3.key, s.key)
    assert np.float32(0.5) <= s3.lr_scale <= np.float32(1.5)
    assert np.float32(0.9) <= s3.momentum_scale <= np.float32(1.1)


@pytest.mark.parametrize("bad", [
    dict(learning_rate=0.0), dict(momentum=1.0), dict(smoothing_factor=0.0), dict(noise_scale=-1.0),
    dict(loss_correction_factor=0.0), dict(retention_weight=1.5), dict(q_discount=1.5),
    dict(q_epsilon_decay=0.0), dict(gradient_centering="mean"), dict(gradient_buffer_size=0),
    dict(spike_recovery_steps=0), dict(entropy_bins=1), dict(lr_scale_bounds=(1.2, 1.5)),
    dict(momentum_scale_bounds=(0.9, 0.95)), dict(max_momentum=1.0), dict(seed=1.5),
])
def test_invalid_arguments_raise(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        scale_by_enhanced_sgd(**bad)


def test_invalid_lookahead_arguments_raise():
    with pytest.raises(ValueError, match="lookahead_k"):
        enhanced_sgd(lookahead_k=-1)
    with pytest.raises(ValueError, match="lookahead_alpha"):
        enhanced_sgd(lookahead_alpha=0.0, lookahead_k=5)


def test_flag_must_be_python_bool():
    with pytest.raises(TypeError, match="apply_noise"):
        scale_by_enhanced_sgd(apply_noise=1)


# --------------------------------------------------------------------------------------------------
# reproducibility, tracing, lookahead composition
# --------------------------------------------------------------------------------------------------


def test_seed_reproducibility():
    params, x, y = readme_problem(2)
    a, *_ = train(scale_by_enhanced_sgd(seed=1), params, x, y, 30)
    b, *_ = train(scale_by_enhanced_sgd(seed=1), params, x, y, 30)
    c, *_ = train(scale_by_enhanced_sgd(seed=2), params, x, y, 30)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["w1"], c["w1"])


@pytest.mark.parametrize("x64_on", [False, True])
def test_traced_seed_compiles_once_and_matches_the_constant(x64_on):
    """enhanced_sgd(seed=s) with the seed a traced argument: one compiled init for every seed, the key (and
    bayesian_init's scales) exactly those of the Python int, and one compiled update (it reads no seed)."""
    with jax.enable_x64(x64_on):
        params, x, y = readme_problem(0)
        init = jax.jit(lambda p, seed: enhanced_sgd(seed=seed, bayesian_init=True).init(p))
        g = jax.grad(mlp_loss)(params, x[:64], y[:64])
        upd = jax.jit(lambda s, seed: enhanced_sgd(seed=seed, bayesian_init=True).update(g, s, params, value=1.0))
        for seed in (3, -5, 2**40 + 3):
            # (jitted as well: eager op-by-op arithmetic rounds bayesian_init's 1 + σz without the fused multiply-add)
            ref = jax.jit(enhanced_sgd(seed=seed, bayesian_init=True).init)(params)
            # the array jax.random.PRNGKey makes of a Python int
            traced = init(params, jnp.asarray(np.int64(seed)))
            jax.tree.map(np.testing.assert_array_equal, ref, traced)
            u_ref, s_ref = jax.jit(lambda s, seed=seed: enhanced_sgd(seed=seed, bayesian_init=True).update(
                g, s, params, value=1.0))(ref)
            u, s = upd(traced, jnp.asarray(np.int64(seed)))
            jax.tree.map(np.testing.assert_array_equal, (u_ref, s_ref), (u, s))
        assert init._cache_size() == 1
        assert upd._cache_size() == 1
        with pytest.raises(ValueError, match="seed"):
            enhanced_sgd(seed=jnp.asarray(1.5))
        with pytest.raises(ValueError, match="seed"):
            enhanced_sgd(seed=jnp.arange(2))


def test_with_and_without_value_trace_once_each():
    params, x, y = readme_problem(0)
    opt = scale_by_enhanced_sgd()
    traces = []

    @jax.jit
    def step(p, s, value=None):
        traces.append(value is None)
        return opt.update(jax.grad(mlp_loss)(p, x[:64], y[:64]), s, p, value=value)

    s = opt.init(params)
    for i in range(3):
        _, s = step(params, s, jnp.float32(1.0 + i))
        _, s = step(params, s)
    assert sorted(traces) == [False, True]


def test_without_value_keeps_controller_fields():
    params, x, y = readme_problem(0)
    opt = scale_by_enhanced_sgd(bayesian_init=True, seed=3)
    s = opt.init(params)
    g = jax.grad(mlp_loss)(params, x[:64], y[:64])
    _, s1 = opt.update(g, s, params)
    for name in ("lr_scale", "momentum_scale", "q_table", "epsilon", "loss_count", "spike_level", "has_prev"):
        np.testing.assert_array_equal(getattr(s1, name), getattr(s, name))
    np.testing.assert_allclose(s1.last_lr, 0.01 * s.lr_scale, rtol=1e-6)


def test_lookahead_k0_is_the_inner_transformation():
    params, x, y = readme_problem(0)
    a, *_ = train(enhanced_sgd(lookahead_k=0, seed=3), params, x, y, 20)
    b, *_ = train(scale_by_enhanced_sgd(seed=3), params, x, y, 20)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@needs_lookahead
def test_enhanced_sgd_is_lookahead_around_inner():
    params, x, y = readme_problem(0)
    a, *_ = train(enhanced_sgd(lookahead_k=4, lookahead_alpha=0.3, seed=3), params, x, y, 22)
    b, *_ = train(lookahead(scale_by_enhanced_sgd(seed=3), 4, 0.3), params, x, y, 22)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    c, *_ = train(enhanced_sgd(lookahead_k=1, lookahead_alpha=1.0, seed=3), params, x, y, 22)
    d, *_ = train(scale_by_enhanced_sgd(seed=3), params, x, y, 22)
    # k = 1, α = 1 is the inner step up to rounding: the fast weights become (θ + u) − θ added to θ, and XLA
    # may contract θ − lr·b into one fused multiply-add in one program and not in the other (1-ulp steps).
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), c, d)


def test_inject_hyperparams_matches():
    params, x, y = readme_problem(0)
    static = ("apply_noise", "adaptive_momentum", "gradient_centering", "centering_axis", "gradient_clipping",
              "gradient_retention", "gradient_buffer_size", "lr_scale_bounds", "momentum_scale_bounds",
              "max_momentum", "spike_recovery_steps", "entropy_bins", "bayesian_init", "bayesian_prior_std",
              "seed", "lookahead_k")
    injected = optax.inject_hyperparams(enhanced_sgd, static_args=static)(learning_rate=0.02, lookahead_k=0)
    a, *_ = train(injected, params, x, y, 20)
    b, *_ = train(enhanced_sgd(learning_rate=0.02, lookahead_k=0), params, x, y, 20)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), a, b)


def test_bfloat16_parameters():
    params, x, y = readme_problem(0, dtype=jnp.bfloat16)
    opt = scale_by_enhanced_sgd()
    p, s, losses, _ = train(opt, params, x, y, 100)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(p))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(s.momentum_buffer))
    losses = np.asarray(losses, np.float32)
    assert np.all(np.isfinite(losses)) and losses[-10:].mean() < 0.5 * losses[:10].mean()


# --------------------------------------------------------------------------------------------------
# stability on the README problem (defaults: noise, retention, centering, clipping, controller, value)
# --------------------------------------------------------------------------------------------------


def _stability(num_seeds: int, opt_factory):
    """Train ``num_seeds`` README problems at once (vmap over seeds); also torch-SGD-equivalent baselines."""
    steps = 200
    seeds = jnp.arange(num_seeds)

    def run(seed, opt):
        params, x, y = readme_problem(seed)
        state = opt.init(params)
        state = jax.tree.map(lambda v: v, state)

        def rekey(s):  # a different optimizer key per seed (the factory's seed is static)
            if isinstance(s, T.EnhancedSGDState):
                return s._replace(key=jax.random.fold_in(s.key, seed))
            return s

        state = jax.tree.map(rekey, state, is_leaf=lambda v: isinstance(v, T.EnhancedSGDState))

        def body(carry, i):
            p, s = carry
            xb, yb = batch(x, y, i)
            loss, g = jax.value_and_grad(mlp_loss)(p, xb, yb)
            u, s = opt.update(g, s, p, value=loss)
            inner = [v for v in jax.tree.leaves(s, is_leaf=lambda v: isinstance(v, T.EnhancedSGDState))
                     if isinstance(v, T.EnhancedSGDState)]
            lr_mom = (inner[0].last_lr, inner[0].last_momentum) if inner else (jnp.nan, jnp.nan)
            return (optax.apply_updates(p, u), s), (loss, *lr_mom)

        (params, _), (losses, lrs, moms) = jax.lax.scan(body, (params, state), jnp.arange(steps))
        return mlp_loss(params, x, y), losses, lrs, moms

    ours = jax.jit(jax.vmap(lambda s: run(s, opt_factory())))(seeds)
    base = jax.jit(jax.vmap(lambda s: run(s, jaxopt_suite.sgd(0.01, momentum=0.9))))(seeds)
    return ours, base[0]


def _check_stability(num_seeds, factory):
    (final, losses, lrs, moms), sgd_final = _stability(num_seeds, factory)
    final, sgd_final = np.asarray(final), np.asarray(sgd_final)
    assert np.all(np.isfinite(np.asarray(losses))) and np.all(np.isfinite(final))
    lrs, moms = np.asarray(lrs), np.asarray(moms)
    assert np.all(lrs >= 0.5 * 0.5 * 0.01 * (1 - 1e-6)) and np.all(lrs <= 1.5 * 0.01 * (1 + 1e-6))
    assert np.all(moms <= 0.99 + 1e-6) and np.all(moms >= 0.9 * 0.9 * 0.9 * (1 - 1e-6))
    assert np.all(final <= np.maximum(2 * sgd_final, 0.1)), (final, sgd_final)
    return final


@pytest.mark.slow  # a study (~25 s); the default suite trains the README problem in test_step_modes_train_the_readme_model
@needs_lookahead
def test_stability_readme_problem_5_seeds_defaults():
    _check_stability(5, lambda: enhanced_sgd())


@pytest.mark.slow
@needs_lookahead
def test_stability_readme_problem_20_seeds_defaults():
    final = _check_stability(20, lambda: enhanced_sgd())
    assert final.shape == (20,)


# --------------------------------------------------------------------------------------------------
# parity anchor with the reference implementation (github.com/waefrebeorn/EnhancedSGD @ 75e9fad)
# --------------------------------------------------------------------------------------------------

REFERENCE_ENV = "ENHANCEDSGD_REFERENCE"


def _load_reference():
    """The reference ``EnhancedSGD.py`` from the path in ``$ENHANCEDSGD_REFERENCE`` (skip when unset)."""
    import importlib.util
    import logging
    import os

    path = os.environ.get(REFERENCE_ENV)
    if not path:
        pytest.skip(f"set {REFERENCE_ENV} to the path of the reference EnhancedSGD.py "
                    "(github.com/waefrebeorn/EnhancedSGD, commit 75e9fad; not on PyPI)")
    pytest.importorskip("scipy")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    spec = importlib.util.spec_from_file_location("enhancedsgd_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # it configures logging at import: undo that
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    return module


@pytest.mark.parametrize("loss_scale", [1.0, 100.0])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_parity_anchor_with_the_reference_implementation(precision, loss_scale):
    """No loss, noise/retention/lookahead off, centering 'all': equal to the reference's ``step()``.

    The reference's lookahead and buffer are dead code and its loss-free step is exactly the gradient path,
    so both see the same gradients (taken at the reference's parameters) for 200 steps.
    """
    torch = pytest.importorskip("torch")
    module = _load_reference()
    lr = 0.01 if loss_scale == 1.0 else 0.001
    tdtype = torch.float64 if precision == "float64" else torch.float32
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 50), torch.nn.ReLU(), torch.nn.Linear(50, 2)).to(tdtype)
    _, x, y = readme_problem(0, out=2)
    x, y = torch.tensor(np.array(x)).to(tdtype), torch.tensor(np.array(y)).to(tdtype)
    reference = module.EnhancedSGD(model.parameters(), lr=lr, momentum=0.9, smoothing_factor=0.1, apply_noise=False,
                                   gradient_centering=True, gradient_clipping=True)
    ctx = jax.enable_x64(True) if precision == "float64" else contextlib.nullcontext()
    with ctx:
        tx = scale_by_enhanced_sgd(lr, 0.9, 0.1, apply_noise=False, gradient_retention=False,
                                   gradient_centering="all", gradient_clipping=True)

        @jax.jit
        def update(g, s, p):
            u, s = tx.update(g, s)
            return optax.apply_updates(p, u), s

        params = [jnp.asarray(p.detach().numpy()) for p in model.parameters()]
        state = tx.init(params)
        err = scale = 0.0
        for i in range(200):
            start = (i * 64) % 1024
            reference.zero_grad()
            loss = loss_scale * torch.nn.functional.mse_loss(model(x[start:start + 64]), y[start:start + 64])
            loss.backward()
            params, state = update([jnp.asarray(p.grad.numpy()) for p in model.parameters()], state, params)
            reference.step()
            for p, q in zip(model.parameters(), params):
                err = max(err, float(np.max(np.abs(p.detach().numpy() - np.asarray(q)))))
                scale = max(scale, float(np.max(np.abs(p.detach().numpy()))))
        engaged = float(reference.grad_var)
    tol = 1e-6 if precision == "float32" else 1e-10
    print(f"reference anchor {precision} loss x{loss_scale:g}: max|dp|/max|p| = {err / scale:.2e}")
    assert err / scale <= tol, err / scale
    assert engaged > 0
