"""The non-finite policy: what an optimizer does when a gradient element (or the loss) is NaN or ±inf.

Every factory of the suite takes the keyword-only option ``nonfinite``:

* ``"propagate"`` (default): no check is added; the optimizer does what its reference does. For the
  torch/optax rules (SGD, Adam/AdamW, ADOPT, ASGD, Lookahead, AutoSGM) a NaN or inf in one gradient element
  flows into the parameters and the state, as in ``torch.optim`` and ``optax``. ELRA treats a non-finite
  loss or gradient as a retrace (its own rule), EnhancedSGD skips its own inner step (see their docs). The
  transformation and its state structure are exactly those of the factory without the option.
* ``"skip"``: :func:`skip_nonfinite` wraps the transformation. When any gradient element (of the entries
  ``grad_mask`` selects) or, for optimizers that take the loss (``value``), the loss is not finite, the
  update is ``-0.0`` everywhere (so ``params + update`` is ``params`` bit for bit, ``-0.0`` params
  included) and the whole inner state is the old one, bit for bit; the state's ``skips`` counter (int32)
  counts such steps. Otherwise the inner update and state are returned unchanged. Pure, no host sync.
* ``"raise"``: :func:`raise_nonfinite` wraps the transformation with a check that runs before the inner
  update. Called eagerly (concrete inputs) it raises ``FloatingPointError`` naming the first non-finite
  leaf (its key path) or the loss; under ``jit`` the check is a :func:`jax.experimental.checkify.check`,
  which needs the caller to functionalise it: ``checkify.checkify(jax.jit(step), errors=
  checkify.user_checks)`` returns an error whose ``throw()`` raises naming the leaf. A jitted update that
  is not checkified fails to trace with JAX's message about an un-functionalised ``check``: "raise" is
  meant for eager debugging and for checkified steps. The torch bridge implements "raise" itself, in
  torch, at ``step()``.

Why not ``optax.apply_if_finite``: it zeroes the update with ``+0.0`` (a ``-0.0`` parameter becomes
``+0.0``), checks every leaf whatever ``grad_mask`` says (the bridge's masked-out segments), ignores the
loss, changes its own counters on every step and gives up (applies the non-finite update) after
``max_consecutive_errors``. :func:`skip_nonfinite` never applies a non-finite step.

Interplay with ``inject_hyperparams``: ``nonfinite`` is static (declared with
:func:`~jaxopt_suite._common.declare_static`). ``inject_hyperparams(factory)(..., nonfinite="skip")`` puts
the skip *inside* the injected state, so ``InjectHyperparamsState.count`` (and schedules evaluated by
optax at it) still advance on a skipped step; wrap the other way round, ``skip_nonfinite(
inject_hyperparams(factory)(...))``, to freeze those too.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _common as C

__all__ = ["NONFINITE_POLICIES", "SkipNonFiniteState", "all_finite", "apply_nonfinite_policy", "check_nonfinite",
           "nonfinite_option", "raise_nonfinite", "skip_nonfinite"]

#: The allowed values of the ``nonfinite`` option.
NONFINITE_POLICIES = ("propagate", "skip", "raise")

#: Extra ``update`` argument the torch bridge uses to pass a finiteness decision made over several compiled
#: steps (a float scalar, > 0 meaning finite); :func:`skip_nonfinite` ANDs it with its own check.
EXTERNAL_FLAG = "nonfinite_flag"


def check_nonfinite(nonfinite: Any) -> str:
    """``nonfinite`` if it is one of :data:`NONFINITE_POLICIES`, else ``ValueError`` naming the allowed values."""
    C.check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    return nonfinite


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      skips: int32 scalar, the number of steps skipped because a gradient or the loss was not finite
        (saturates at the int32 maximum).
      inner_state: the wrapped transformation's state (unchanged, bit for bit, by a skipped step).
    """

    skips: jax.Array
    inner_state: Any


def _leaf_finite(g: jax.Array, mask: Optional[Any], segments: Optional[C.FlatLayout]) -> jax.Array:
    """One bool scalar: every element of ``g`` that ``mask`` selects is finite.

    ``g − g`` is exactly 0 for a finite element and NaN for NaN or ±inf, so the sum of the selected
    differences is finite exactly when they all are (one fused reduction, no boolean array).
    """
    d = g - g
    if mask is not None:
        m = jnp.asarray(mask, bool)
        if segments is not None and m.ndim == 1:
            m = C.per_element(m, segments)
        d = jnp.where(m, d, jnp.zeros_like(d))
    return jnp.isfinite(jnp.sum(d))


def _leaf_flags(updates, grad_mask, segments):
    """``[(key path, bool scalar)]`` per leaf of ``updates`` (``None`` leaves skipped)."""
    masks = C.leaf_masks(grad_mask, updates)
    flat, _ = jax.tree_util.tree_flatten_with_path(updates, is_leaf=lambda x: x is None)
    mask_leaves = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
    out = []
    for (path, g), m in zip(flat, mask_leaves):
        if g is None:
            continue
        out.append((jax.tree_util.keystr(path), _leaf_finite(jnp.asarray(g), m, segments)))
    return out


def all_finite(updates: Any, grad_mask: Any = None, segments: Optional[C.FlatLayout] = None) -> jax.Array:
    """Bool scalar: every gradient element is finite, except those ``grad_mask`` leaves out.

    ``grad_mask`` follows the suite's convention (a bool scalar per leaf; in the flat layout one bool per
    segment plus the dead entry, ``segments`` giving the layout): a False entry is not checked, since
    masked-out gradients are not used. Complex leaves are finite when both parts are.
    """
    flags = [ok for _, ok in _leaf_flags(updates, grad_mask, segments)]
    out = jnp.ones((), bool)
    for ok in flags:
        out = out & ok
    return out


def _neg_zero_like(u: jax.Array) -> jax.Array:
    """``-0.0`` of ``u``'s shape and dtype: ``x + (-0.0) == x`` bit for bit for every ``x`` (``±0`` included)."""
    u = jnp.asarray(u)
    if jnp.iscomplexobj(u):
        part = jnp.full(u.shape, -0.0, C.real_dtype(u.dtype))
        return jax.lax.complex(part, part)
    if jnp.issubdtype(u.dtype, jnp.floating):
        return jnp.full(u.shape, -0.0, u.dtype)
    return jnp.zeros_like(u)


def skip_nonfinite(inner: optax.GradientTransformation, *, segments: Optional[C.FlatLayout] = None,
                   check_value: bool = False) -> optax.GradientTransformationExtraArgs:
    """Skip every step whose gradient (or, with ``check_value``, loss ``value``) is not finite.

    With ``ok = all_finite(updates, grad_mask, segments) ∧ isfinite(value)`` (the second term only with
    ``check_value`` and a ``value`` passed; ANDed with the extra arg ``nonfinite_flag > 0`` when given)::

        u, s' = inner.update(updates, s, params, **extra)       (always computed: no branch on data)
        ok:      return u, SkipNonFiniteState(skips, s')
        not ok:  return -0.0 (every element), SkipNonFiniteState(skips + 1, s)

    The selection is a ``jnp.where`` per leaf, so a skipped step leaves the parameters (``p + (-0.0) = p``)
    and the inner state bit-identical, and a run with skipped steps continues exactly as one that never saw
    them (for deterministic optimizers; a stochastic one's PRNG key is state too, so it is not advanced
    either). Every extra argument (``value``, ``grad_mask``...) is forwarded to ``inner``.
    """
    inner = optax.with_extra_args_support(inner)
    segments = segments if isinstance(segments, C.FlatLayout) else None

    def init_fn(params):
        return SkipNonFiniteState(skips=jnp.zeros((), jnp.int32), inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        flag = extra_args.pop(EXTERNAL_FLAG, None)
        ok = all_finite(updates, extra_args.get("grad_mask"), segments)
        value = extra_args.get("value")
        if check_value and value is not None:
            ok = ok & jnp.all(jnp.isfinite(jnp.asarray(value)))
        if flag is not None:
            ok = ok & (jnp.asarray(flag) > 0)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        out = jax.tree.map(lambda u: None if u is None else jnp.where(ok, u, _neg_zero_like(u)), new_updates,
                           is_leaf=lambda x: x is None)
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_inner, state.inner_state)
        skips = jnp.where(ok, state.skips, optax.safe_increment(state.skips))
        return out, SkipNonFiniteState(skips=skips, inner_state=kept)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def raise_nonfinite(inner: optax.GradientTransformation, *, segments: Optional[C.FlatLayout] = None,
                    check_value: bool = False) -> optax.GradientTransformationExtraArgs:
    """Check the gradient (and, with ``check_value``, the loss) before ``inner.update``; state unchanged.

    Concrete inputs: ``FloatingPointError`` naming the first non-finite leaf (key path, e.g. ``[1]`` or
    ``['w']``) or the loss, raised before ``inner.update`` runs. Traced inputs (``jit``): one
    :func:`jax.experimental.checkify.check` per leaf with the same message, surfaced by
    ``checkify.checkify(..., errors=checkify.user_checks)``; without ``checkify`` JAX refuses to stage the
    check (an error at trace time), so the failure is never silent. The transformation's state is the
    inner one (same structure as ``"propagate"``).
    """
    from jax.experimental import checkify

    inner = optax.with_extra_args_support(inner)
    segments = segments if isinstance(segments, C.FlatLayout) else None

    def update_fn(updates, state, params=None, **extra_args):
        checks = [(f"gradient leaf {path}", ok)
                  for path, ok in _leaf_flags(updates, extra_args.get("grad_mask"), segments)]
        value = extra_args.get("value")
        if check_value and value is not None:
            checks.append(("loss value", jnp.all(jnp.isfinite(jnp.asarray(value)))))
        for what, ok in checks:
            msg = f"nonfinite='raise': the {what} is not finite (NaN or inf); nothing was updated"
            if C.is_concrete(ok):
                if not bool(np.asarray(ok)):
                    raise FloatingPointError(msg)
            else:
                checkify.check(ok, msg)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def apply_nonfinite_policy(tx: optax.GradientTransformation, nonfinite: str, *,
                           segments: Optional[C.FlatLayout] = None, check_value: bool = False):
    """``tx`` for "propagate" (the very object), else wrapped by :func:`skip_nonfinite` / :func:`raise_nonfinite`."""
    check_nonfinite(nonfinite)
    if nonfinite == "propagate":
        return tx
    wrap = skip_nonfinite if nonfinite == "skip" else raise_nonfinite
    return wrap(tx, segments=segments, check_value=check_value)


def nonfinite_option(*, value: bool = False):
    """Factory decorator adding the keyword-only option ``nonfinite: str = "propagate"``.

    The decorated factory validates the option (``ValueError`` naming the allowed values), builds the
    transformation without it and applies :func:`apply_nonfinite_policy` (with the factory's ``segments``,
    so the flat layout's ``grad_mask`` is honoured). ``value=True``: the optimizer takes the loss
    (``value=`` in ``update``), which the policy then checks too. Apply it below
    :func:`~jaxopt_suite._common.declare_static` and list ``"nonfinite"`` there.
    """

    def deco(factory):
        signature = inspect.signature(factory)
        if "nonfinite" in signature.parameters:
            raise TypeError(f"{factory.__name__} already has a 'nonfinite' parameter")

        @functools.wraps(factory)
        def with_policy(*args, nonfinite: str = "propagate", **kwargs):
            check_nonfinite(nonfinite)
            tx = factory(*args, **kwargs)
            if nonfinite == "propagate":
                return tx
            segments = signature.bind_partial(*args, **kwargs).arguments.get("segments")
            return apply_nonfinite_policy(tx, nonfinite, segments=segments, check_value=value)

        del with_policy.__wrapped__  # the signature below (with the option) is the factory's real one
        params = list(signature.parameters.values())
        option = inspect.Parameter("nonfinite", inspect.Parameter.KEYWORD_ONLY, default="propagate",
                                   annotation="str")
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        with_policy.__signature__ = signature.replace(parameters=params[:at] + [option] + params[at:])
        with_policy.nonfinite_checks_value = value
        return with_policy

    return deco
