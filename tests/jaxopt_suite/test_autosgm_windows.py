"""AutoSGM windows (learning-rate schedules): closed-form values, restarts, units, grids, validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite.autosgm import autosgm, autosgm_window, kronecker_positions

POSITIONS = np.array([0, 25, 50, 75, 99])


def values(window, counts):
    return np.asarray(window(jnp.asarray(counts)), np.float64)


@pytest.mark.parametrize("rcm, n, expected", [
    (1, 2.0, [1, 0.8536, 0.5, 0.1464, 0.0002]),
    (2, 1.0, [1, 0.75, 0.5, 0.25, 0.01]),
    (3, 0.5, [1, 0.6818, 0.4142, 0.1892, 0.0070]),
    (4, 2.0, [1, 0.8789, 0.5625, 0.1914, 0.0004]),
    (5, 4.0, [1, 0.84, 0.5, 0.16, 0.0036]),
    (6, 4.0, [1, 0.9658, 0.8431, 0.5059, 0.0189]),
])
def test_half_windows_table(rcm, n, expected):
    np.testing.assert_allclose(values(autosgm_window(rcm, n=n, tau=1, spe=100), POSITIONS), expected, atol=1e-4)


@pytest.mark.parametrize("rcm, n, shape", [
    (1, 2.0, lambda f: np.cos(0.5 * np.pi * f) ** 2),
    (1, 3.0, lambda f: np.cos(0.5 * np.pi * f) ** 3),
    (2, 2.0, lambda f: (1 - f) ** 2),
    (3, 0.2, lambda f: (0.2**f - 0.2) / 0.8),
    (4, 1.8, lambda f: (1 - f**1.8) ** 2),
])
def test_half_window_closed_form_with_floor(rcm, n, shape):
    length, floor = 37, 0.15
    f = np.arange(length) / length
    with jax.enable_x64(True):
        got = values(autosgm_window(rcm, n=n, x=floor, tau=1, spe=length), np.arange(length))
    np.testing.assert_allclose(got, floor + (1 - floor) * shape(f), rtol=1e-12, atol=1e-14)


def test_logistic_mid_inflection_closed_form_with_sub_windows():
    length, num_sub, n = 30, 3, 2.5
    sigma = lambda z: 1 / (1 + 2.0**z)  # noqa: E731
    centres = (np.arange(num_sub) + 0.5) / num_sub
    mean_sigma = lambda f: np.mean([sigma(2 * num_sub * n * (f - c)) for c in centres], axis=0)  # noqa: E731
    f = np.arange(length) / length
    expected = (mean_sigma(f) - mean_sigma(1.0)) / (mean_sigma(0.0) - mean_sigma(1.0))
    with jax.enable_x64(True):
        got = values(autosgm_window(5, n=n, tau=1, spe=length, cfact=num_sub), np.arange(length))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.all(np.diff(got) < 0)


def test_full_window_raised_cosine():
    expected = [0.1, 0.185942, 0.410942, 0.689058, 0.914058, 1, 0.914058, 0.689058, 0.410942, 0.185942]
    got = values(autosgm_window(1, n=2, x=0.1, m=0, tau=1, spe=10), np.arange(10))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_flat_top_fraction():
    got = values(autosgm_window(2, n=1, e=0.5, tau=1, spe=10), np.arange(10))
    np.testing.assert_allclose(got, [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2], atol=1e-6)


def test_staircase_of_sub_windows():
    expected = [1, 0.951184, 0.833333, 0.715482, 0.666667, 0.617851, 0.5, 0.382149, 0.333333, 0.284518, 0.166667,
                0.048816]
    got = values(autosgm_window(1, n=2, tau=1, spe=12, cfact=3), np.arange(12))
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("rcm, n", [(1, 2.0), (2, 1.0), (3, 0.5), (4, 2.0), (5, 4.0), (6, 4.0)])
@pytest.mark.parametrize("m", [0, 1])
def test_restart_and_range(rcm, n, m):
    length = 16
    window = autosgm_window(rcm, n=n, m=m, x=0.2, tau=2, spe=8)
    first = values(window, np.arange(length))
    np.testing.assert_array_equal(values(window, np.arange(length) + length), first)
    np.testing.assert_array_equal(values(window, np.arange(length) + 7 * length), first)
    assert np.all(first <= 1 + 1e-7) and np.all(first >= 0.2 - 1e-7)
    if m == 1:
        assert first[0] == 1 and np.all(np.diff(first) <= 1e-7)


def test_full_window_without_floor_starts_at_zero():
    assert values(autosgm_window(1, n=2, m=0, tau=1, spe=10), [0])[0] == pytest.approx(0.0, abs=1e-7)


def test_per_epoch_reset_cfact2():
    spe = 6
    window = autosgm_window(1, n=2, tau=3, spe=spe, cfact=2)
    got = values(window, np.arange(3 * spe))
    np.testing.assert_array_equal(got[:spe], got[spe:2 * spe])
    np.testing.assert_allclose(got[:spe], np.cos(0.5 * np.pi * np.arange(spe) / spe) ** 2, atol=1e-6)


def test_per_epoch_units_cfact0():
    spe, tau = 5, 4
    window = autosgm_window(1, n=2, tau=tau, spe=spe, cfact=0)
    got = values(window, np.arange(2 * tau * spe)).reshape(2 * tau, spe)
    assert np.all(got == got[:, :1])  # constant within an epoch
    np.testing.assert_allclose(got[:tau, 0], np.cos(0.5 * np.pi * np.arange(tau) / tau) ** 2, atol=1e-6)
    np.testing.assert_array_equal(got[tau:, 0], got[:tau, 0])  # restarts after tau epochs


def test_kronecker_grid():
    np.testing.assert_allclose(kronecker_positions(8),
                               [0, 0.09017, 0.236068, 0.326238, 0.472136, 0.618034, 0.708204, 0.854102], atol=1e-6)
    np.testing.assert_allclose(kronecker_positions(5), [0, 0.236068, 0.472136, 0.618034, 0.854102], atol=1e-6)
    got = values(autosgm_window(1, n=2, tau=1, spe=5, inseq=1), np.arange(5))
    np.testing.assert_allclose(got, [1, 0.868684, 0.543713, 0.318813, 0.051609], atol=1e-6)


def test_flat_window():
    np.testing.assert_array_equal(values(autosgm_window(0, spe=1), np.arange(5)), np.ones(5))


def test_jit_and_vmap_agree():
    window = autosgm_window(5, n=4, m=0, x=0.05, tau=2, spe=25, e=0.2)
    counts = jnp.arange(120)
    eager = np.asarray([float(window(c)) for c in range(120)])
    np.testing.assert_allclose(np.asarray(jax.jit(window)(counts)), eager, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(window)(counts)), eager, rtol=1e-6)


def test_usable_as_an_optax_schedule():
    window = autosgm_window(1, n=2, tau=1, spe=10)
    tx = optax.sgd(learning_rate=lambda c: 0.1 * window(c))
    params = jnp.zeros(2)
    state = tx.init(params)
    for count in range(4):
        updates, state = tx.update(jnp.ones(2), state)
        assert float(updates[0]) == pytest.approx(-0.1 * math.cos(0.5 * math.pi * count / 10) ** 2, rel=1e-6)


def test_transform_applies_the_window():
    window = autosgm_window(3, n=0.5, x=0.1, tau=1, spe=7)
    tx = autosgm(0.25, aoptlr=False, beta_i=0.0, window=window)
    params = jnp.zeros(3)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for count in range(15):
        updates, state = step(jnp.ones(3), state, params)
        assert float(updates[0]) == pytest.approx(-0.25 * float(np.float32(window(count))), rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rcm=7), "rcm"),
    (dict(inseq=2), "inseq"),
    (dict(x=1.5), "x"),
    (dict(m=2), "m"),
    (dict(tau=0), "tau"),
    (dict(spe=0), "spe"),
    (dict(cfact=-1), "cfact"),
    (dict(e=1.0), "e"),
    (dict(n=0.0), "n"),
    (dict(rcm=3, n=1.5), "n"),
    (dict(spe=1), "L"),
    (dict(cfact=0, tau=1, spe=10), "tau"),
    (dict(inseq=1, spe=2**22 + 1), "inseq"),
])
def test_validation(kwargs, match):
    base = dict(rcm=1, spe=10)
    with pytest.raises(ValueError, match=match):
        autosgm_window(**{**base, **kwargs})


def test_rcm0_is_not_validated_further():
    # a flat window needs no length (the reference raises for tau·spe < 2 even when inactive)
    assert float(autosgm_window(0, spe=1, tau=1)(3)) == 1.0
