"""The first-order lowpass filter F(β, γ, η, D) that AutoSGM uses for every average.

AutoSGM reads heavy-ball momentum, Nesterov momentum and Adam's moment estimates as one filter: a pole β,
a zero γ and an input gain η′, in transposed canonical form. With state ``S`` (shaped like the input), input
``x_t`` and step ``t ≥ 1`` (η′ = η when η ≠ 0, else 1 − β)::

    x′ = η′·x_t
    q  = S + x′
    y  = q / (1 if t == 1 else 1 − γ)
    S ← β·q − γ·x′
    y ← y · ((1 − β)/η′) / (1 − β^t)            (debias, D = True)

Its transfer function is η′(1 − γz⁻¹)/(1 − βz⁻¹); after the 1/(1 − γ) normalisation the DC gain is
η′/(1 − β) (= 1 for η′ = 1 − β). γ = 0 is an exponential moving average (Adam's bias-corrected EMA with
debiasing); γ = β/(1 + β) with η′ = 1 is Nesterov's momentum; γ = 0 with η′ = 1 and no debiasing is torch's
heavy-ball buffer. The first output is never divided by 1 − γ.

References:
  O. Somefun, "AutoSGM: A Unified Lowpass Regularization Framework for Accelerated Learning", ICASSP 2024.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _common as C


def compute_dtype() -> Any:
    """float64 when x64 is enabled, else float32: the dtype of schedules and debias factors."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def is_zero(value: Any) -> bool:
    """True only for a concrete value that is exactly zero (traced values are never known to be zero)."""
    if not C.is_concrete(value):
        return False
    return bool(np.all(np.asarray(value) == 0))


def input_gain(beta: Any, eta: Any, one_minus_beta: Any = None) -> Any:
    """η′: ``eta`` when non-zero, else 1 − β (in Python double for Python numbers, as the reference forms it)."""
    one_minus_beta = C.one_minus(beta) if one_minus_beta is None else one_minus_beta
    if C.is_concrete(eta):
        return one_minus_beta if is_zero(eta) else (float(eta) if np.ndim(eta) == 0 else eta)
    return jnp.where(jnp.asarray(eta) != 0, eta, one_minus_beta)


def debias_factor(beta: Any, eta: Any, count: jax.Array, dtype: Any, one_minus_beta: Any = None) -> jax.Array:
    """((1 − β)/η′) / (1 − β^t), computed in ``dtype``; 1 − β^t as −expm1(t·log1p(−(1 − β))) (accurate)."""
    one_minus_beta = C.one_minus(beta) if one_minus_beta is None else one_minus_beta
    gain = input_gain(beta, eta, one_minus_beta)
    ratio = jnp.asarray(one_minus_beta, dtype) / jnp.asarray(gain, dtype)
    return ratio / C.bias_correction_from(one_minus_beta, count, dtype)


def lowpass(
    state: jax.Array,
    x: jax.Array,
    count: jax.Array,
    beta: Any,
    gamma: Any = 0.0,
    eta: Any = 0.0,
    *,
    debias: bool = False,
    segments: Any = None,
    one_minus_beta: Any = None,
    one_minus_gamma: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """One step of F(β, γ, η, D) on ``x``: returns ``(y, new_state)`` in ``x``'s dtype.

    State representation: with γ a concrete 0 the state holds the pre-pole sum q_t (S_t = β·q_t is formed at
    the next step, with the same roundings); otherwise it holds S_t. Both start at zero.

    Args:
      state: filter state (zeros before the first step), shaped like ``x``.
      x: the input ``x_t``.
      count: the step ``t ≥ 1`` of this tensor (int; 0-d, or one entry per segment in the flat layout, where
        the per-tensor factors are formed per segment and then broadcast to the elements).
      beta: pole β ∈ [0, 1).
      gamma: zero γ (γ < β, 0 = pure pole).
      eta: input gain (0 → 1 − β).
      debias: multiply the output by ((1 − β)/η′)/(1 − β^t) (computed in float64 with x64, else float32,
        then cast to the input dtype; for float16 inputs the product is formed in float32 and rounded once,
        since the factor can exceed float16's range).
      segments: flat layout (``x`` and ``state`` are flat buffers; per-segment factors are broadcast).
      one_minus_beta: 1 − β when known more precisely than β (a traced float32 β = 0.9999 carries 1 − β
        only to 1.7e-4 relative; the torch bridge passes the complements formed in double on the host).
      one_minus_gamma: 1 − γ, likewise.
    """
    dtype = x.dtype
    # per-tensor quantities (the first-step test, the debias factor) are formed on ``count`` itself (0-d, or
    # one entry per segment) and only then broadcast to the elements: the same scalar arithmetic in both
    # layouts (bit-identical results), and no transcendental per element in the flat layout
    t = count
    gain = jnp.asarray(input_gain(beta, eta, one_minus_beta), dtype)
    beta_t = jnp.asarray(beta, dtype)
    weighted = gain * x
    if is_zero(gamma):
        # pre-pole state: the stored value is q_t itself and S_{t-1} = β·q_{t-1} is formed here (the same
        # two roundings as storing S); the output and the new state are then one value, so a donated state
        # buffer can be overwritten in place without XLA copying the old one first.
        q = beta_t * state + weighted
        y = q
        new_state = q
    else:
        q = state + weighted
        gamma_t = jnp.asarray(gamma, dtype)
        # 1 − γ in double for Python numbers (as the reference forms it), then the division in x's dtype.
        norm = jnp.asarray(C.one_minus(gamma) if one_minus_gamma is None else one_minus_gamma, dtype)
        y = jnp.where(C.per_element(t == 1, segments), q, q / norm)
        new_state = beta_t * q - gamma_t * weighted
    if debias:
        factor = debias_factor(beta, eta, t, compute_dtype(), one_minus_beta)
        if jnp.finfo(dtype).minexp > jnp.finfo(jnp.float32).minexp:
            # float16: 1/(1 − β^t) passes float16's maximum (65504) for β > 0.99998, and q·inf would be inf
            # (or NaN for q = 0); the product is formed in float32 and rounded once
            y = (y.astype(jnp.float32) * C.per_element(factor.astype(jnp.float32), segments)).astype(dtype)
        else:
            y = y * C.per_element(factor.astype(dtype), segments)
    return y.astype(dtype), new_state.astype(dtype)
