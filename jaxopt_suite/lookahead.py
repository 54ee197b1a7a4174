"""Lookahead: k fast steps of an inner optimizer, then one interpolation toward the slow weights.

Update rule (θ = fast weights = the model params, φ = slow weights, α = ``slow_step_size``)::

    φ ← θ                                   (at init)
    θ ← θ + inner_update(g)                 (every step)
    every k-th step:   θ ← φ + α (θ − φ);   φ ← θ

α weights the *fast* weights: ``θ ← α θ + (1 − α) φ``. The slow weights live in the optimizer state, so
plain params work (``nnx.Optimizer``, ``TrainState``) and :func:`lookahead_slow_params` reads them.

References:
  Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019,
  arXiv:1907.08610 (and the authors' code, michaelrzhang/lookahead).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _common as C
from .nonfinite import nonfinite_option
from .adam import adam
from .sgd import sgd

RESETS = ("none", "inner", "momentum")
# State fields that hold a momentum (first moment) and are zeroed by ``reset="momentum"``.
MOMENTUM_FIELDS = ("momentum_buffer", "mu")


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`.

    Attributes:
      count: int32 number of fast steps since the last synchronisation (one counter for all leaves).
      slow: the slow weights φ, shaped like the params.
      inner_state: the inner optimizer's state.
    """

    count: Any
    slow: Any
    inner_state: Any


def _check_sync_period(sync_period: Any) -> None:
    if not C.is_concrete(sync_period):
        return
    arr = np.asarray(sync_period)
    if arr.shape != () or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer) or int(arr) < 1:
        raise ValueError(f"Invalid sync_period: {sync_period!r}; expected an integer >= 1.")


def _zero_momentum(state: Any, sync: jax.Array) -> Any:
    """Zero every ``momentum_buffer``/``mu`` field of the NamedTuple states inside ``state`` where ``sync``."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        fields = {}
        for name in state._fields:
            value = getattr(state, name)
            if name in MOMENTUM_FIELDS and value is not None:
                fields[name] = jax.tree.map(lambda x: jnp.where(sync, jnp.zeros_like(x), x), value)
            else:
                fields[name] = _zero_momentum(value, sync)
        return type(state)(**fields)
    if isinstance(state, (tuple, list)):
        return type(state)(_zero_momentum(s, sync) for s in state)
    if isinstance(state, dict):
        return {k: _zero_momentum(v, sync) for k, v in state.items()}
    return state


@C.declare_static("inner", "reset", "skip_if")
def lookahead(
    inner: optax.GradientTransformation,
    sync_period: Any = 5,
    slow_step_size: Any = 0.5,
    *,
    reset: str = "none",
    skip_if: Optional[Callable[[Any, Any], Any]] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap ``inner`` with Lookahead; the slow weights are kept in the state.

    .. math::
        \theta_{t} = \theta_{t-1} + u_t \quad (u_t = \text{inner update}),\qquad
        \text{every } k \text{ steps: } \phi \leftarrow \phi + \alpha(\theta_t - \phi),\ \theta_t \leftarrow \phi

    The returned update already contains the synchronisation; apply it with ``optax.apply_updates`` and do
    not modify it (the new slow weights are formed exactly as ``apply_updates`` forms θ, so fast == slow
    bitwise after a sync). The synchronisation moves every leaf, masked (``grad_mask``) or not.

    Args:
      inner: the fast optimizer; ``update`` receives every extra argument (``value``, ``grad_mask``...).
      sync_period: k, an integer ≥ 1 (array-like: may be injected).
      slow_step_size: α ∈ (0, 1], the weight of the fast weights at a sync (array-like).
      reset: what happens to the inner state at a sync: ``"none"`` (default; keep it), ``"inner"``
        (re-initialise it entirely, like ``optax.lookahead(reset_state=True)``; this also restarts the
        schedules and counts inside it) or ``"momentum"`` (zero the ``momentum_buffer``/``mu`` fields, like
        pytorch_optimizer's ``pullback_momentum="reset"`` for SGD).
      skip_if: ``None``, or ``skip_if(old_inner_state, new_inner_state) -> bool`` (traced) saying that the
        inner optimizer skipped this step (e.g. EnhancedSGD on a non-finite gradient or loss). A skipped
        step is not a fast step: the inner update passes through unchanged, the counter does not advance and
        no synchronisation happens (the slow weights and the inner state's reset are untouched); the next
        step that is taken synchronises instead.

    ``update`` requires ``params``.

    References:
      Zhang et al. 2019, arXiv:1907.08610.
    """
    _check_sync_period(sync_period)
    C.check_range("slow_step_size", slow_step_size, gt=0.0, le=1.0)
    C.check_choice("reset", reset, RESETS)

    def init_fn(params):
        return LookaheadState(
            count=jnp.zeros((), jnp.int32),
            slow=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("lookahead needs params (the fast weights) in update.")
        fast_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        sync = state.count + 1 >= jnp.asarray(sync_period)
        skipped = None
        if skip_if is not None:
            skipped = jnp.asarray(skip_if(state.inner_state, inner_state), bool)
            sync = sync & ~skipped

        def one(theta, u, phi):
            alpha = jnp.asarray(slow_step_size).astype(C.real_dtype(theta.dtype))
            fast = (theta + u).astype(theta.dtype)
            target = phi + alpha * (fast - phi)
            out = jnp.where(sync, (target - theta).astype(u.dtype), u)
            new_slow = jnp.where(sync, (theta + out).astype(theta.dtype), phi)
            return out, new_slow

        res = jax.tree.map(one, params, fast_updates, state.slow)
        out = jax.tree.map(lambda _, r: r[0], params, res)
        slow = jax.tree.map(lambda _, r: r[1], params, res)
        if reset == "inner":
            fresh = inner.init(params)
            inner_state = jax.tree.map(lambda new, old: jnp.where(sync, new, old), fresh, inner_state)
        elif reset == "momentum":
            inner_state = _zero_momentum(inner_state, sync)
        count = jnp.where(sync, jnp.zeros_like(state.count), state.count + 1)
        if skipped is not None:
            count = jnp.where(skipped, state.count, count)
        return out, LookaheadState(count=count, slow=slow, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lookahead_slow_params(state: Any) -> Any:
    """The slow weights φ of the first :class:`LookaheadState` found in a (possibly nested) state.

    Raises ``ValueError`` when the state contains no Lookahead state.
    """
    stack = [state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, LookaheadState):
            return node.slow
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (tuple, list)):
            stack.extend(node)
    raise ValueError("The state contains no LookaheadState; was the optimizer built with lookahead()?")


@C.declare_static("nesterov", "maximize", "reset", "weight_decay_mask", "segments")
@nonfinite_option()
def lookahead_sgd(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    momentum: Optional[Any] = None,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    sync_period: Any = 5,
    slow_step_size: Any = 0.5,
    *,
    nesterov: bool = False,
    maximize: bool = False,
    reset: str = "none",
    weight_decay_mask: Any = None,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    """``lookahead(sgd(...), sync_period, slow_step_size, reset=reset)`` as one factory.

    Every numeric argument (the SGD ones and ``sync_period``, ``slow_step_size``) is a plain argument, so
    ``optax.inject_hyperparams`` and the torch bridge's param groups can set them. See :func:`lookahead`
    and :func:`jaxopt_suite.sgd` for the rules; the defaults are torch's SGD and Lookahead defaults.
    """
    return lookahead(
        sgd(learning_rate, momentum, dampening, weight_decay, nesterov=nesterov, maximize=maximize,
            weight_decay_mask=weight_decay_mask, segments=segments),
        sync_period, slow_step_size, reset=reset,
    )


@C.declare_static("amsgrad", "decoupled_weight_decay", "maximize", "reset", "weight_decay_mask", "segments")
@nonfinite_option()
def lookahead_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    sync_period: Any = 5,
    slow_step_size: Any = 0.5,
    *,
    amsgrad: bool = False,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    reset: str = "none",
    weight_decay_mask: Any = None,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    """``lookahead(adam(...), sync_period, slow_step_size, reset=reset)`` as one factory.

    ``decoupled_weight_decay=True`` gives Lookahead over AdamW (pass ``weight_decay`` explicitly: the Adam
    default λ = 0 applies). See :func:`lookahead` and :func:`jaxopt_suite.adam`.
    """
    return lookahead(
        adam(learning_rate, b1, b2, eps, weight_decay, amsgrad=amsgrad,
             decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
             weight_decay_mask=weight_decay_mask, segments=segments),
        sync_period, slow_step_size, reset=reset,
    )
