"""SGD with momentum, dampening and Nesterov, exactly as ``torch.optim.SGD``.

Update rule (per parameter with a gradient; λ = weight decay, μ = momentum, τ = dampening)::

    g ← −g                      (maximize)
    g ← g + λ θ
    b ← g                       at the first momentum step (dampening is not applied to it)
    b ← μ b + (1 − τ) g         afterwards
    d ← g + μ b  (nesterov)  |  b  (heavy ball)  |  g  (μ = 0)
    θ ← θ − lr · d

References:
  Sutskever et al., "On the importance of initialization and momentum in deep learning", ICML 2013.
  PyTorch ``torch.optim.SGD`` (2.x, single-tensor path), which this reproduces to rounding.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from . import _common as C
from .nonfinite import nonfinite_option


class SGDState(NamedTuple):
    """State of :func:`scale_by_sgd_momentum`.

    Attributes:
      count: per-leaf int32 number of momentum-buffer updates (0 before the first; ``momentum_buffer`` is
        then still unset, as torch creates it lazily).
      momentum_buffer: the momentum buffer ``b``, shaped like the params.
    """

    count: Any
    momentum_buffer: Any


@C.declare_static("nesterov", "segments")
def scale_by_sgd_momentum(
    momentum: Any = 0.9,
    dampening: Any = 0.0,
    *,
    nesterov: bool = False,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    """torch's momentum buffer: ``b ← g`` first, then ``b ← μb + (1−τ)g``; output ``b`` or ``g + μb``.

    Where ``μ == 0`` the gradient passes through unchanged and neither the buffer nor the counter moves,
    so a scheduler that later raises μ creates the buffer at that step with ``b = g``, as torch does.

    Args:
      momentum: μ in [0, 1] (array-like, injectable).
      dampening: τ; not applied to the first buffer.
      nesterov: output ``g + μ b`` instead of ``b``.
      segments: flat layout (torch bridge); ``None`` for ordinary pytrees.
    """
    C.static_bool("nesterov", nesterov)

    def init_fn(params):
        return SGDState(
            count=jax.tree.map(lambda p: C.leaf_scalar(p, segments), params),
            momentum_buffer=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None, *, grad_mask=None, **extra_args):
        del params, extra_args
        mu = jnp.asarray(momentum)
        active = mu != 0

        def one(g, b, count):
            first = C.per_element(count, segments) == 0
            b_new = jnp.where(first, g, (momentum * b + (1 - dampening) * g).astype(g.dtype))
            direction = (g + momentum * b_new).astype(g.dtype) if nesterov else b_new
            return jnp.where(active, direction, g), jnp.where(active, b_new, b)

        pairs = jax.tree.map(one, updates, state.momentum_buffer, state.count)
        out = jax.tree.map(lambda _, p: p[0], updates, pairs)
        buf = jax.tree.map(lambda _, p: p[1], updates, pairs)
        count = jax.tree.map(lambda c: jnp.where(active, C.safe_increment(c), c), state.count)
        buf = C.masked_tree(grad_mask, buf, state.momentum_buffer, segments)
        count = C.masked_tree(grad_mask, count, state.count, segments)
        return out, SGDState(count=count, momentum_buffer=buf)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@C.declare_static("nesterov", "maximize", "weight_decay_mask", "segments")
@nonfinite_option()
def sgd(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    momentum: Optional[Any] = None,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    nesterov: bool = False,
    maximize: bool = False,
    weight_decay_mask: Any = None,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Stochastic gradient descent exactly as ``torch.optim.SGD``.

    .. math::
        g_t = \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1},\quad
        b_1 = g_1,\; b_t = \mu b_{t-1} + (1-\tau) g_t,\quad
        \theta_t = \theta_{t-1} - \eta\,(g_t + \mu b_t \text{ if nesterov else } b_t)

    Args:
      learning_rate: η ≥ 0, or an optax schedule.
      momentum: μ ∈ [0, 1]. ``None`` (default) keeps no buffer at all (torch's μ = 0 path with no state);
        a number, 0.0 included, keeps a buffer so that μ can be scheduled.
      dampening: τ (torch's dampening; the first buffer is not dampened).
      weight_decay: λ ≥ 0, coupled L2 (added to the gradient before the momentum).
      nesterov: Nesterov momentum; requires μ > 0 and τ = 0.
      maximize: ascend instead of descend (negation happens before weight decay, as in torch).
      weight_decay_mask: optional bool pytree (or callable of params) selecting decayed leaves.
      segments: flat layout of the torch bridge.

    Extra args: ``grad_mask`` (per-leaf bools; False leaves are skipped entirely). Others are ignored.

    References:
      PyTorch ``torch.optim.SGD``; Sutskever et al. 2013 (Nesterov form).
    """
    C.check_learning_rate(learning_rate)
    C.check_range("momentum", momentum, ge=0.0, le=1.0, optional=True)  # None: no momentum buffer
    C.check_range("dampening", dampening, ge=0.0, le=1.0)
    C.check_range("weight_decay", weight_decay, ge=0.0)
    C.static_bool("nesterov", nesterov)
    C.static_bool("maximize", maximize)
    if nesterov:
        if momentum is None or (C.is_concrete(momentum) and float(momentum) <= 0.0):
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum > 0 (got "
                             f"momentum={momentum!r}) and zero dampening.")
        if C.is_concrete(dampening) and float(dampening) != 0.0:
            raise ValueError("Invalid nesterov: Nesterov momentum requires zero dampening (got "
                             f"dampening={dampening!r}).")
    return C.chain(
        C.maybe_maximize(maximize),
        C.add_coupled_weight_decay(weight_decay, weight_decay_mask),
        None if momentum is None else scale_by_sgd_momentum(momentum, dampening, nesterov=nesterov, segments=segments),
        optax.scale_by_learning_rate(learning_rate),
        C.zero_masked(segments=segments),
    )
