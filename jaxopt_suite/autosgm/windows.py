"""AutoSGM windows: learning-rate schedules as window functions W(t) ∈ [x, 1].

A window is a shape S(f), monotone from S(0) = 1 to S(1) = 0, sampled at a position f ∈ [0, 1) that advances
with the step and restarts every window length L::

    j = (t − 1) mod L                     (per-epoch unit, cfact = 0: j = ⌊(t − 1)/spe⌋ mod tau)
    f = j / L                             (inseq = 0)  |  f = K_L[j]  (inseq = 1, sorted Kronecker set)
    f = |2f − 1|                          (full window, m = 0: warm-up → top → anneal)
    W = 1 if f < e, else with f ← (f − e)/(1 − e):
    i = max(1, ⌈M·f⌉),  φ = M·f − i + 1  (M sub-windows: a staircase when cfact ≥ 3)
    W = x + (1 − x)·S

Shapes (σ(z) = 1/(1 + 2^z)):

====  ==========================  =================================================================
rcm   name                        S
====  ==========================  =================================================================
0     flat                        W ≡ 1
1     raised cosine               (M − i + cos(πφ/2)^n)/M      (n = 2, M = 1: cosine annealing)
2     polynomial                  (1 − f)^n                    (n = 1: linear; with m = 0 triangular)
3     exponential                 (M − i + (n^φ − n)/(1 − n))/M,   0 < n < 1
4     simple polynomial           (M − i + (1 − φ^n)²)/M
5     logistic, mid inflection    (Y(f) − Y(1))/(Y(0) − Y(1)),  Y(f) = (1/M)Σ_j σ(2Mn(f − (j + ½)/M))
6     logistic, late inflection   (M − i + (σ(2n(φ − 7/8)) − σ(n/4))/(σ(−7n/4) − σ(n/4)))/M
====  ==========================  =================================================================

Window length and sub-windows by ``cfact`` (the step unit): 1 → L = tau·spe iterations; 2 → L = spe
(restarts every epoch); ≥ 3 → L = tau·spe with M = cfact sub-windows; 0 → L = tau epochs (W is constant
within an epoch). The window restarts every L units, forever (the schedule is stateless).

References:
  O. Somefun, "AutoSGM: A Unified Lowpass Regularization Framework for Accelerated Learning", ICASSP 2024;
  the reference implementation's README documents these options (rc_cfg = (rcm, inseq, x, n, m, tau, spe,
  cfact, e)).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .filters import compute_dtype

WINDOW_NAMES = {
    0: "flat",
    1: "raised cosine",
    2: "polynomial",
    3: "exponential",
    4: "simple polynomial",
    5: "logistic (mid inflection)",
    6: "logistic (late inflection)",
}

MAX_KRONECKER_LENGTH = 2**22


def kronecker_positions(length: int) -> np.ndarray:
    """The sorted golden-ratio Kronecker set ``sort{frac(k·φ) : k = 0..L−1}``, φ = (√5 − 1)/2, float64.

    Sampling the window shape on these positions (``inseq=1``) spreads the first L samples of an infinite
    low-discrepancy sequence over [0, 1) and then visits them in ascending order.
    """
    length = int(length)
    if length < 1:
        raise ValueError(f"Invalid length: {length!r}; expected an integer >= 1.")
    golden = 0.5 * (math.sqrt(5.0) - 1.0)
    return np.sort(np.mod(np.arange(length, dtype=np.float64) * golden, 1.0))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _require_int(name: str, value: Any, low: int) -> int:
    if not _is_int(value) or int(value) < low:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {low}.")
    return int(value)


def window_geometry(rcm: int, tau: int, spe: int, cfact: int) -> tuple[int, int]:
    """Window length L and number of sub-windows M for a step unit ``cfact``."""
    del rcm
    if cfact == 0:
        return tau, 1
    if cfact == 2:
        return spe, 1
    if cfact == 1:
        return tau * spe, 1
    return tau * spe, cfact


def validate_window(rcm, *, spe, tau, inseq, x, n, m, cfact, e) -> None:
    """ValueError naming the argument and its allowed range (only checked when ``rcm != 0``)."""
    if not _is_int(rcm) or not 0 <= int(rcm) <= 6:
        raise ValueError(f"Invalid rcm: {rcm!r}; expected an integer in [0, 6] ({WINDOW_NAMES}).")
    if rcm == 0:
        return
    for name, value in (("x", x), ("n", n), ("e", e)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"Invalid {name}: {value!r}; expected a real number.")
        if not math.isfinite(float(value)):
            raise ValueError(f"Invalid {name}: {value!r}; expected a finite real number.")
    if inseq not in (0, 1) or isinstance(inseq, bool):
        raise ValueError(f"Invalid inseq: {inseq!r}; expected 0 (uniform) or 1 (Kronecker).")
    if not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"Invalid x: {x!r}; allowed range is [0, 1].")
    if m not in (0, 1) or isinstance(m, bool):
        raise ValueError(f"Invalid m: {m!r}; expected 1 (half window) or 0 (full window).")
    tau = _require_int("tau", tau, 1)
    spe = _require_int("spe", spe, 1)
    cfact = _require_int("cfact", cfact, 0)
    if not 0.0 <= float(e) < 1.0:
        raise ValueError(f"Invalid e: {e!r}; allowed range is [0, 1).")
    if rcm == 3:
        if not 0.0 < float(n) < 1.0:
            raise ValueError(f"Invalid n: {n!r}; the exponential window (rcm=3) needs 0 < n < 1.")
    elif not float(n) > 0.0:
        raise ValueError(f"Invalid n: {n!r}; allowed range is (0, inf).")
    if cfact == 0 and tau < 2:
        raise ValueError(f"Invalid tau: {tau!r}; per-epoch windows (cfact=0) need tau >= 2 epochs.")
    length, _ = window_geometry(rcm, tau, spe, cfact)
    if length < 2:
        raise ValueError(f"Invalid tau/spe: window length L = {length} (tau={tau}, spe={spe}, cfact={cfact}); "
                         "expected L >= 2.")
    if inseq == 1 and length > MAX_KRONECKER_LENGTH:
        raise ValueError(f"Invalid inseq: the Kronecker grid needs L <= 2**22, got L = {length}.")


def _sigma(z):
    """σ(z) = 1/(1 + 2^z), the base-2 logistic of the reference windows."""
    return 1.0 / (1.0 + jnp.exp2(z))


def window_shape(rcm: int, f: jax.Array, *, n: float, num_sub: int) -> jax.Array:
    """The shape S(f) of window ``rcm`` for f ∈ [0, 1] with ``num_sub`` sub-windows (see module docstring)."""
    big_m = num_sub
    i = jnp.maximum(1.0, jnp.ceil(big_m * f))
    phi = big_m * f - i + 1.0
    if rcm == 1:
        sub = jnp.cos(0.5 * jnp.pi * phi) ** n
    elif rcm == 2:
        return (1.0 - f) ** n
    elif rcm == 3:
        sub = (n**phi - n) / (1.0 - n)
    elif rcm == 4:
        sub = (1.0 - phi**n) ** 2
    elif rcm == 5:
        rate = 2.0 * big_m * n
        centres = (np.arange(big_m, dtype=np.float64) + 0.5) / big_m

        def mean_sigma(pos):
            return sum(_sigma(rate * (pos - c)) for c in centres) / big_m

        top, bottom = mean_sigma(0.0), mean_sigma(1.0)
        return (mean_sigma(f) - bottom) / (top - bottom)
    elif rcm == 6:
        low, high = _sigma(0.25 * n), _sigma(-1.75 * n)
        sub = (_sigma(2.0 * n * (phi - 0.875)) - low) / (high - low)
    else:  # pragma: no cover - validated before
        raise ValueError(f"Invalid rcm: {rcm!r}")
    return (big_m - i + sub) / big_m


def autosgm_window(
    rcm: int = 1,
    *,
    spe: int,
    tau: int = 1,
    inseq: int = 0,
    x: float = 0.0,
    n: float = 2.0,
    m: int = 1,
    cfact: int = 1,
    e: float = 0.0,
) -> Callable[[Any], jax.Array]:
    r"""An AutoSGM window as an optax schedule: ``schedule(count)`` returns W(t = count + 1).

    .. math::
        W(t) = x + (1 - x)\,S(f_t), \qquad f_t = \frac{(t - 1) \bmod L}{L}

    (see the module docstring for the shapes S, full windows, flat tops, sub-windows and units).

    Args:
      rcm: window shape 0–6 (0 = flat, 1 raised cosine, 2 polynomial, 3 exponential, 4 simple polynomial,
        5 logistic mid-inflection, 6 logistic late-inflection).
      spe: steps per epoch (integer ≥ 1).
      tau: number of epochs (integer ≥ 1; ≥ 2 for cfact = 0).
      inseq: 0 uniform grid, 1 sorted golden-ratio Kronecker grid (L ≤ 2²²).
      x: floor, the minimum fraction of unity, in [0, 1].
      n: shape parameter (order, rate; 0 < n < 1 for rcm = 3).
      m: 1 half window (top → anneal), 0 full window (warm-up → top → anneal).
      cfact: step unit (0 per epoch, 1 per iteration, 2 per iteration restarting each epoch, ≥ 3 staircase of
        cfact sub-windows over tau·spe iterations).
      e: flat-top fraction in [0, 1).

    Returns:
      A pure function of the 0-based integer ``count`` (any shape; works under ``jit`` and ``vmap``) giving W
      in float64 when x64 is on, else float32.

    Example::

        optax.sgd(learning_rate=lambda c: 0.1 * autosgm_window(1, n=2, tau=1, spe=1000)(c))

    References:
      Somefun, ICASSP 2024 (AutoSGM); reference README ``rc_cfg``.
    """
    validate_window(rcm, spe=spe, tau=tau, inseq=inseq, x=x, n=n, m=m, cfact=cfact, e=e)
    rcm = int(rcm)
    x, n, e = float(x), float(n), float(e)
    if rcm == 0:
        def flat(count):
            return jnp.ones(jnp.shape(count), compute_dtype())
        return flat

    length, num_sub = window_geometry(rcm, int(tau), int(spe), int(cfact))
    positions = kronecker_positions(length) if inseq == 1 else None
    spe_i, tau_i = int(spe), int(tau)

    def schedule(count):
        dtype = compute_dtype()
        c = jnp.asarray(count)
        c = c.astype(jnp.int64 if dtype == jnp.float64 else jnp.int32)
        if cfact == 0:
            j = (c // spe_i) % tau_i
        else:
            j = c % length
        if positions is None:
            f = j.astype(dtype) / length
        else:
            f = jnp.asarray(positions, dtype)[j]
        if m == 0:
            f = jnp.abs(2.0 * f - 1.0)
        flat_top = f < e
        if e != 0.0:
            f = (f - e) / (1.0 - e)
        f = jnp.clip(f, 0.0, 1.0)
        shape = window_shape(rcm, f, n=n, num_sub=num_sub)
        w = shape * (1.0 - x) + x
        return jnp.where(flat_top, jnp.ones_like(w), w).astype(dtype)

    return schedule
