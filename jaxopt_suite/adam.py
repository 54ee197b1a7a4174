"""Adam, AdamW and AMSGrad exactly as ``torch.optim.Adam`` / ``torch.optim.AdamW``.

Update rule (per parameter with a gradient; t = that parameter's step after increment)::

    g ← −g (maximize);   g ← g + λθ (coupled)   |   θ ← θ(1 − lr·λ) (decoupled, AdamW)
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g²
    v̂ ← max(v̂, v)                              (amsgrad, on the raw v)
    θ ← θ − (lr / (1 − β1^t)) · m / (√v(̂) / √(1 − β2^t) + ε)

ε is added outside the root and is not bias-corrected (optax's ``eps``, not ``eps_root``).

References:
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
  Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019 (AdamW).
  Reddi et al., "On the Convergence of Adam and Beyond", ICLR 2018 (AMSGrad).
  PyTorch ``torch.optim.Adam`` / ``AdamW`` 2.x, single-tensor path, which this reproduces to rounding.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from . import _common as C
from .nonfinite import nonfinite_option


class AdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
      count: per-leaf int32 step counts ``t`` (torch's per-parameter ``step``), stacked in one vector
        in leaf order (:func:`~jaxopt_suite._common.stacked_leaf_scalars`; per-segment vectors in the
        flat layout).
      mu: first moment ``m`` (torch ``exp_avg``).
      nu: second moment ``v`` (torch ``exp_avg_sq``).
      nu_max: running maximum of ``v`` with amsgrad (torch ``max_exp_avg_sq``), else ``None``.
    """

    count: Any
    mu: Any
    nu: Any
    nu_max: Any

    stacked_leaf_fields = ("count",)  # read through C.STACKED_FIELDS_ATTR


@C.declare_static("amsgrad", "segments")
def scale_by_adam(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    *,
    amsgrad: bool = False,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam's direction ``m / (√v/√bc2 + ε) / bc1`` with per-leaf counts (torch association).

    Bias corrections ``bc_i = 1 − β_i^t`` are formed as ``−expm1(t·log1p(−(1−β_i)))`` in float32 (float64
    for float64 leaves), which stays within a few ulp of torch's double-precision scalars. The update uses
    their reciprocals, ``u = m / (√v · bc2^(-1/2) + ε) · bc1^(-1)``. The per-leaf counts are one vector
    (:func:`~jaxopt_suite._common.stacked_leaf_scalars`), so the count increment and the corrections of all
    leaves are one small kernel each (:func:`~jaxopt_suite._common.stacked_leaf_map`) rather than kernels
    and state buffers per leaf; XLA forms these reciprocals for the divisions anyway, so the result is
    bit-identical. Complex leaves are treated as (real, imag) pairs, as torch does with ``view_as_real``.
    """
    C.static_bool("amsgrad", amsgrad)
    c1, c2 = C.one_minus(b1), C.one_minus(b2)

    def init_fn(params):
        return AdamState(
            count=C.stacked_leaf_scalars(params, segments),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
            nu_max=jax.tree.map(jnp.zeros_like, params) if amsgrad else None,
        )

    def update_fn(updates, state, params=None, *, grad_mask=None, **extra_args):
        del params, extra_args
        count = jax.tree.map(C.safe_increment, state.count)  # one vector (pytree layout)
        nu_max_in = state.nu_max if amsgrad else jax.tree.map(lambda _: None, updates)

        def inverse_corrections(t, sd):
            # 1/bc1 and 1/√bc2: the reciprocals XLA would form anyway for the divisions below; computed
            # for all leaves together instead of as tiny per-leaf kernels.
            return (1.0 / C.bias_correction_from(c1, t, sd),
                    jax.lax.rsqrt(C.bias_correction_from(c2, t, sd)))

        scalar_dtypes = jax.tree.map(lambda g: C.scalar_dtype_for(g.dtype), updates)
        inv_bc1, inv_bc2_sqrt = C.stacked_leaf_map(inverse_corrections, count, scalar_dtypes, segments)

        def one(g, m, v, vmax, inv_c1, inv_c2_sqrt):
            inv_c1 = C.per_element(inv_c1, segments)
            inv_c2_sqrt = C.per_element(inv_c2_sqrt, segments)

            def rule(g, m, v, vmax):
                m = C.lerp(m, g, c1).astype(g.dtype)
                v = (v * b2 + c2 * (g * g)).astype(g.dtype)
                if vmax is not None:
                    vmax = jnp.maximum(vmax, v)
                denom = jnp.sqrt(vmax if vmax is not None else v) * inv_c2_sqrt + eps
                u = (m / denom * inv_c1).astype(g.dtype)
                return (u, m, v, vmax) if vmax is not None else (u, m, v)

            out = C.componentwise(rule, g, m, v, vmax)
            return out if vmax is not None else (*out, None)

        res = jax.tree.map(one, updates, state.mu, state.nu, nu_max_in, inv_bc1, inv_bc2_sqrt,
                           is_leaf=lambda x: x is None)
        pick = lambda i: jax.tree.map(lambda _, r: r[i], updates, res)  # noqa: E731
        u, mu, nu = pick(0), pick(1), pick(2)
        nu_max = pick(3) if amsgrad else None
        count = C.masked_stacked(grad_mask, count, state.count, updates, segments)
        moments = [C.masked_tree(grad_mask, n, o, segments) for n, o in zip((mu, nu, nu_max), state[1:])]
        new = AdamState(count, *moments)
        return u, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DecoupledDecayState(NamedTuple):
    """State of :func:`apply_decoupled_weight_decay`: the schedule's step count (``None`` for a constant
    learning rate)."""

    count: Any


def apply_decoupled_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
) -> optax.GradientTransformationExtraArgs:
    """Decoupled decay applied to the parameters before the (already lr-scaled) step, rounded as torch does.

    Given the step ``s`` (e.g. ``−η·a`` from :func:`optax.scale_by_learning_rate`) and the parameters θ,
    it returns ``u = θ' − θ`` with ::

        θ₁ = θ · (1 − ηλ)        (the factor rounded once to θ's precision)
        θ' = θ₁ + s

    so that ``θ + u`` is θ' exactly whenever θ and θ' are within a factor 2 (Sterbenz) — the common case.
    This reproduces torch's two roundings of θ (``θ.mul_(1 − ηλ)`` and then the Adam step), which matter
    in float32: the single update ``−η(a + λθ)`` (``optax.adamw``'s form) ends 2.7e-5 from torch on
    parameters of size ~15 after 100 steps, this form within 1.1e-6. In float64 both agree with torch
    to ~1e-14.

    A schedule is evaluated at this block's own count, which advances as
    :func:`optax.scale_by_learning_rate`'s does, so both see the same η.

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    scheduled = callable(learning_rate)

    def init_fn(params):
        del params
        return DecoupledDecayState(count=jnp.zeros([], jnp.int32) if scheduled else None)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("apply_decoupled_weight_decay needs the parameters: pass params= to update")
        if scheduled:
            lr = learning_rate(state.count)
            new_state = DecoupledDecayState(count=optax.safe_increment(state.count))
        else:
            lr, new_state = learning_rate, state
        # Formed before any cast: Python floats give torch's double-precision scalar.
        factor = 1.0 - lr * weight_decay

        def one(s, p):
            real = C.real_dtype(p.dtype)
            # θ₁ must be rounded on its own: the compiler contracts θ·f + s into one fused multiply-add
            # (a single rounding where torch has two), even across an optimization barrier. A select
            # between the product and the add prevents the contraction; it changes no value (θ·f is
            # NaN where θ is).
            theta1 = jnp.where(jnp.isnan(p), p, p * jnp.asarray(factor).astype(real))
            return ((theta1 + s) - p).astype(s.dtype)

        return jax.tree.map(one, updates, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validate_adam(learning_rate, b1, b2, eps, weight_decay):
    C.check_learning_rate(learning_rate)
    C.check_range("b1", b1, ge=0.0, lt=1.0)
    C.check_range("b2", b2, ge=0.0, lt=1.0)
    C.check_range("eps", eps, ge=0.0)
    C.check_range("weight_decay", weight_decay, ge=0.0)


@C.declare_static("amsgrad", "decoupled_weight_decay", "maximize", "weight_decay_mask", "segments")
@nonfinite_option()
def adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    amsgrad: bool = False,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    weight_decay_mask: Any = None,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam exactly as ``torch.optim.Adam`` (coupled L2 decay by default).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    with ``g_t = ±∇f + λθ`` (coupled) or, when ``decoupled_weight_decay``, ``θ ← θ(1 − ηλ)`` before the step
    (:func:`apply_decoupled_weight_decay`, placed after the learning-rate block).

    Args:
      learning_rate: η ≥ 0 or a schedule.
      b1: β₁ ∈ [0, 1), decay of the first moment.
      b2: β₂ ∈ [0, 1), decay of the second moment.
      eps: ε ≥ 0 (outside the root).
      weight_decay: λ ≥ 0.
      amsgrad: use ``max`` of the raw second moments.
      decoupled_weight_decay: AdamW-style decay (see :func:`adamw`).
      maximize: ascend.
      weight_decay_mask: bool pytree or callable selecting decayed leaves.
      segments: bridge flat layout.

    Extra args: ``grad_mask``. Others are ignored.

    References:
      Kingma & Ba 2015; Reddi et al. 2018; PyTorch ``torch.optim.Adam``.
    """
    _validate_adam(learning_rate, b1, b2, eps, weight_decay)
    C.static_bool("decoupled_weight_decay", decoupled_weight_decay)
    C.static_bool("maximize", maximize)
    if decoupled_weight_decay:
        coupled_decay = None
        # After the lr-scaled step: θ(1 − ηλ) and then the step, rounded as torch's two in-place operations.
        decoupled_decay = apply_decoupled_weight_decay(learning_rate, weight_decay)
        if weight_decay_mask is not None:
            decoupled_decay = optax.masked(decoupled_decay, weight_decay_mask)
    else:
        coupled_decay = optax.add_decayed_weights(weight_decay, weight_decay_mask)
        decoupled_decay = None
    return C.chain(
        C.maybe_maximize(maximize),
        coupled_decay,
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad, segments=segments),
        optax.scale_by_learning_rate(learning_rate),
        decoupled_decay,
        C.zero_masked(segments=segments),
    )


@C.declare_static("amsgrad", "maximize", "weight_decay_mask", "segments")
@nonfinite_option()
def adamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-2,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    weight_decay_mask: Any = None,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW exactly as ``torch.optim.AdamW``: Adam with decoupled decay ``θ ← θ − ηλθ``; λ defaults to 1e-2.

    .. math::
        \theta_t = \theta_{t-1} - \eta\Big(\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t}/\sqrt{1-\beta_2^t}+\epsilon}
        + \lambda\theta_{t-1}\Big)

    Note torch's default λ = 1e-2 (optax's ``adamw`` defaults to 1e-4).

    References:
      Loshchilov & Hutter 2019; PyTorch ``torch.optim.AdamW``.
    """
    return adam(
        learning_rate, b1, b2, eps, weight_decay,
        amsgrad=amsgrad, decoupled_weight_decay=True, maximize=maximize,
        weight_decay_mask=weight_decay_mask, segments=segments,
    )
