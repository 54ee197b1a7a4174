"""ADOPT exactly as the official implementation (``torch-adopt`` 0.1.0, clipped variant).

Update rule (per parameter with a gradient; s = that parameter's number of previous calls)::

    g ← −g (maximize);   g ← g + λθ (coupled decay)
    s = 0:  v ← g²                                   (first call: θ, m and decay untouched)
    s > 0:  θ ← θ − lr·λ·θ                           (decoupled decay)
            ĝ ← clip(g / max(√v, ε), −c(s), c(s))     (v is the *previous* second moment; c(s) = s^¼)
            m ← β1 m + (1 − β1) ĝ
            θ ← θ − lr · m                          (no bias correction)
            v ← β2 v + (1 − β2) g²
    s ← s + 1

ε is a floor on √v (not added to it). The clip bound at the first update is c(1) = 1.

References:
  Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate", NeurIPS 2024,
  arXiv:2411.02853.
  ``torch-adopt`` 0.1.0 (github iShohei220/adopt ``src/adopt/adopt.py``), single-tensor path, which this
  reproduces to rounding.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from . import _common as C
from .nonfinite import nonfinite_option


class ADOPTState(NamedTuple):
    """State of :func:`scale_by_adopt`.

    Attributes:
      count: per-leaf int32 number of previous calls ``s`` (torch's per-parameter ``step``).
      mu: first moment of the normalised gradient ``m`` (torch ``exp_avg``).
      nu: second moment ``v`` (torch ``exp_avg_sq``).
    """

    count: Any
    mu: Any
    nu: Any


def default_clip_value(step: jax.Array) -> jax.Array:
    """The official clip bound ``c(s) = s ** 0.25`` (s = number of previous calls, 1 at the first update)."""
    return step**0.25


@C.declare_static("decouple", "clip_value_fn", "segments")
def scale_by_adopt(
    b1: Any = 0.9,
    b2: Any = 0.9999,
    eps: Any = 1e-6,
    weight_decay: Any = 0.0,
    *,
    decouple: bool = False,
    clip_value_fn: Optional[Callable[[jax.Array], jax.Array]] = default_clip_value,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    """ADOPT's direction with per-leaf call counts.

    On a leaf's first call the output is 0 and only ``v ← g²`` happens. Afterwards the output is the new
    first moment ``m'`` (plus ``λθ`` when ``decouple``, so that :func:`optax.scale_by_learning_rate` turns it
    into torch's decoupled decay ``−lr·λ·θ``).

    Args:
      b1: β₁ ∈ [0, 1) of the first moment.
      b2: β₂ ∈ [0, 1) of the second moment.
      eps: floor of ``√v`` (≥ 0).
      weight_decay: λ of the decoupled decay; only used when ``decouple`` (the coupled form is a separate
        :func:`optax.add_decayed_weights` block before this one).
      decouple: emit the decoupled decay term (needs ``params``).
      clip_value_fn: ``s ↦ c(s)``, jnp-traceable; it receives ``s`` as a float array (float32, float64 for
        float64 leaves; one entry per segment in the flat layout). ``None`` disables clipping.
      segments: flat layout of the torch bridge.

    Complex leaves are stepped as (real, imag) pairs, as torch does with ``view_as_real``.
    """
    C.static_bool("decouple", decouple)
    if clip_value_fn is not None and not callable(clip_value_fn):
        raise ValueError(f"Invalid clip_value_fn: {clip_value_fn!r}; expected None or a callable s -> bound.")
    c1, c2 = C.one_minus(b1), C.one_minus(b2)

    def init_fn(params):
        return ADOPTState(
            count=jax.tree.map(lambda p: C.leaf_scalar(p, segments), params),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None, *, grad_mask=None, **extra_args):
        del extra_args
        if decouple and params is None:
            raise ValueError("scale_by_adopt(decouple=True) needs params for the decoupled weight decay.")
        params_in = params if decouple else jax.tree.map(lambda _: None, updates)

        def one(g, m, v, s, p):
            real = C.real_dtype(g.dtype)
            first = C.per_element(s, segments) == 0
            if clip_value_fn is None:
                bound = None
            else:
                sd = C.scalar_dtype_for(g.dtype)
                bound = C.per_element(jnp.asarray(clip_value_fn(s.astype(sd))), segments).astype(real)

            def rule(g, m, v):
                normed = g / jnp.maximum(jnp.sqrt(v), eps).astype(real)
                if bound is not None:
                    normed = jnp.clip(normed, -bound, bound)
                m_next = C.lerp(m, normed, c1).astype(g.dtype)
                v_next = (v * b2 + c2 * g * g).astype(g.dtype)
                v_first = (v + g * g).astype(g.dtype)
                return jnp.where(first, m, m_next), jnp.where(first, v_first, v_next)

            m_new, v_new = C.componentwise(rule, g, m, v)
            direction = m_new if p is None else (m_new + weight_decay * p).astype(g.dtype)
            return jnp.where(first, jnp.zeros_like(direction), direction), m_new, v_new

        res = jax.tree.map(
            one, updates, state.mu, state.nu, state.count, params_in, is_leaf=lambda x: x is None
        )
        pick = lambda i: jax.tree.map(lambda _, r: r[i], updates, res)  # noqa: E731
        new = ADOPTState(count=jax.tree.map(C.safe_increment, state.count), mu=pick(1), nu=pick(2))
        new = ADOPTState(*[C.masked_tree(grad_mask, n, o, segments) for n, o in zip(new, state)])
        return pick(0), new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@C.declare_static("decouple", "clip_value_fn", "maximize", "segments")
@nonfinite_option()
def adopt(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.9999,
    eps: Any = 1e-6,
    weight_decay: Any = 0.0,
    *,
    decouple: bool = False,
    clip_value_fn: Optional[Callable[[jax.Array], jax.Array]] = default_clip_value,
    maximize: bool = False,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ADOPT exactly as ``adopt.ADOPT`` (torch-adopt 0.1.0), with per-parameter step counts.

    .. math::
        \hat g_t = \operatorname{clip}\!\big(g_t / \max(\sqrt{v_{t-1}}, \epsilon),\ \pm c(t-1)\big),\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\hat g_t,\quad
        \theta_t = \theta_{t-1} - \eta\,(m_t + \lambda\theta_{t-1}\,[\text{decouple}]),\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    with ``v_0 = g_0²`` set by the first call, which moves nothing; ``g = ±∇f (+ λθ unless decouple)``.

    Args:
      learning_rate: η ≥ 0 or a schedule.
      b1: β₁ ∈ [0, 1) (torch's ``betas[0]``; default 0.9).
      b2: β₂ ∈ [0, 1) (torch's ``betas[1]``; default 0.9999).
      eps: ε ≥ 0, the floor of ``√v``.
      weight_decay: λ ≥ 0; coupled L2 unless ``decouple``.
      decouple: decoupled decay ``θ ← θ − ηλθ`` (never on a parameter's first call).
      clip_value_fn: clip bound as a function of the number of previous calls (default ``s ** 0.25``);
        ``None`` disables clipping. A callable: list it in ``inject_hyperparams``'s ``static_args``.
      maximize: ascend instead of descend (negation before decay).
      segments: flat layout of the torch bridge.

    Extra args: ``grad_mask`` (per-leaf bools; False leaves are skipped entirely). Others are ignored.

    References:
      Taniguchi et al. 2024, arXiv:2411.02853; ``torch-adopt`` 0.1.0 ``adopt.ADOPT``.
    """
    C.check_learning_rate(learning_rate)
    C.check_range("b1", b1, ge=0.0, lt=1.0)
    C.check_range("b2", b2, ge=0.0, lt=1.0)
    C.check_range("eps", eps, ge=0.0)
    C.check_range("weight_decay", weight_decay, ge=0.0)
    C.static_bool("decouple", decouple)
    C.static_bool("maximize", maximize)
    return C.chain(
        C.maybe_maximize(maximize),
        None if decouple else optax.add_decayed_weights(weight_decay),
        scale_by_adopt(
            b1, b2, eps, weight_decay if decouple else 0.0,
            decouple=decouple, clip_value_fn=clip_value_fn, segments=segments,
        ),
        optax.scale_by_learning_rate(learning_rate),
        C.zero_masked(segments=segments),
    )
