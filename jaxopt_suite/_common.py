"""Shared pieces of every optimizer family: validation, per-leaf scalars, masks, flat layouts.

Two execution layouts exist for every transformation in the suite:

* **pytree layout** (the default, ``segments=None``): each leaf is one parameter tensor, and per-leaf
  scalars (step counters, ASGD's ``eta``...) are 0-d arrays;
* **flat layout** (``segments=FlatLayout``): the torch bridge packs many parameters into one flat 1-D
  buffer. Each parameter is a *segment*; per-leaf scalars become vectors with one entry per segment plus a
  trailing "dead" entry for the zero padding. :func:`per_element` broadcasts them back to elements.

Blocks written with the helpers below work unchanged in both layouts.

The optional extra argument ``grad_mask`` (a pytree of bool scalars shaped like the params, or in the
flat layout one bool vector per buffer) reproduces torch's rule that a parameter whose ``.grad`` is None
is skipped entirely: on a False entry the update is exactly zero and that entry's state is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def is_concrete(value: Any) -> bool:
    """True when ``value`` can be inspected on the host (not a tracer, not a schedule)."""
    if callable(value):
        return False
    if isinstance(value, jax.core.Tracer):
        return False
    try:
        np.asarray(value)
    except Exception:  # noqa: BLE001 - anything we cannot read is treated as symbolic
        return False
    return True


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong kind: ``None``, a string, a bool or a complex number where a real
    number is required.

    A ``TypeError`` (what Python raises for an operand of the wrong type) that is also a ``ValueError``, so
    code catching the range checks' ``ValueError`` catches it too.
    """


def _range_text(ge, gt, le, lt) -> str:
    low = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else "(-inf")
    high = f"{le}]" if le is not None else (f"{lt})" if lt is not None else "inf)")
    return f"{low}, {high}"


def check_range(
    name: str,
    value: Any,
    *,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
    finite: bool = True,
    optional: bool = False,
) -> None:
    """Check a numeric hyperparameter; the message names ``name``, the value and the allowed range.

    * ``None`` raises :class:`HyperparameterTypeError` unless ``optional`` (an argument whose ``None``
      means something, such as SGD's "no momentum buffer").
    * Strings, bools, complex numbers and other non-numbers raise :class:`HyperparameterTypeError`.
    * NaN, and unless ``finite=False`` also ±inf, raise ``ValueError``: the range ``[0, inf)`` is that of
      the finite numbers ``>= 0``. No hyperparameter of the suite has a meaning at infinity (an infinite
      learning rate, decay, ``eps``, ASGD ``alpha``/``t0``... gives NaN parameters or a step that never
      moves), so this is stricter than ``torch.optim``, which accepts them.
    * A value outside the bounds raises ``ValueError``.

    Arrays are checked elementwise (every entry must pass). Traced values (inside ``jit``, e.g. the
    hyperparameters ``optax.inject_hyperparams`` passes to ``update``) and callables are not checked here:
    they are checked where they become concrete (a schedule by :func:`check_learning_rate` at its first
    value, ``inject_hyperparams`` values when ``init`` runs outside ``jit``) or not at all.
    """
    if value is None:
        if optional:
            return
        raise HyperparameterTypeError(
            f"Invalid {name}: None; expected a real number in {_range_text(ge, gt, le, lt)}.")
    if isinstance(value, (str, bytes)):
        raise HyperparameterTypeError(
            f"Invalid {name}: {value!r} (a string); expected a real number in {_range_text(ge, gt, le, lt)}.")
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    # jnp.issubdtype also knows the ml_dtypes floats (bfloat16, float8...) that inject_hyperparams may pass
    if (arr.dtype == bool or not jnp.issubdtype(arr.dtype, jnp.number)
            or jnp.issubdtype(arr.dtype, jnp.complexfloating)):
        kind = "a bool" if arr.dtype == bool else f"of type {type(value).__name__}"
        raise HyperparameterTypeError(
            f"Invalid {name}: {value!r} ({kind}); expected a real number in {_range_text(ge, gt, le, lt)}.")
    x = arr.astype(np.float64)
    bad = (
        (ge is not None and np.any(x < ge))
        or (gt is not None and np.any(x <= gt))
        or (le is not None and np.any(x > le))
        or (lt is not None and np.any(x >= lt))
        or np.any(np.isnan(x))
        or (finite and not np.all(np.isfinite(x)))
    )
    if bad:
        note = " (finite values only)" if finite and np.any(np.isinf(x)) else ""
        raise ValueError(f"Invalid {name}: {value!r}; allowed range is {_range_text(ge, gt, le, lt)}{note}.")


def check_learning_rate(learning_rate: Any, name: str = "learning_rate", **bounds: Any) -> None:
    """A learning rate: a finite number in ``bounds`` (default ``>= 0``), or a schedule checked at its first
    value ``schedule(0)`` (a schedule that needs tracing is checked at use). ``None`` raises."""
    bounds = bounds or {"ge": 0.0}
    if callable(learning_rate):
        try:
            first = learning_rate(0)
        except Exception:  # noqa: BLE001 - schedules that need tracing are checked at use
            return
        check_range(name, first, **bounds)
    else:
        check_range(name, learning_rate, **bounds)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` when a structural option is not one of ``choices``."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {list(choices)!r}.")


# --------------------------------------------------------------------------------------------------
# structural arguments and inject_hyperparams
# --------------------------------------------------------------------------------------------------

#: Attribute of a factory listing the arguments ``inject_hyperparams`` must keep static (set by
#: :func:`declare_static`; read by :func:`static_args_of`, ``jaxopt_suite.inject_hyperparams`` and the registry).
STATIC_ARGS_ATTR = "inject_static_args"
#: Attribute of a factory listing the tail of :data:`STATIC_ARGS_ATTR` that is numbers read by ``init`` only.
INIT_ONLY_ATTR = "inject_init_only_args"


def declare_static(*structural: str, init_only: Sequence[str] = ()):
    """Decorator declaring a factory's arguments that ``optax.inject_hyperparams`` must not trace.

    ``structural``: arguments that fix the computation (integers sizing state or choosing branches, callables
    that are not schedules, layouts, flags). optax injects every number and calls every callable as a
    schedule, so a structural argument arriving as a JAX array is an error here, raised with the remedy
    before the factory's own validation could give a confusing one. ``init_only``: numbers read only by
    ``init`` (kept static too, so that a changed ``state.hyperparams`` entry or a schedule cannot be
    silently ignored after the first step; they may still be arrays, e.g. traced by the torch bridge).
    Both lists, in that order, become the factory's :data:`STATIC_ARGS_ATTR`.

    So that plain ``optax.inject_hyperparams(factory)(...)`` works whenever the user leaves the structural
    arguments at their defaults, the decorated factory's signature shows each structural default that optax
    would trace (a number, or a callable such as ADOPT's ``clip_value_fn``) wrapped in a
    :class:`StaticDefault` (optax binds the defaults too, and passes such a value through untouched); the
    factory unwraps it. Read a factory's real defaults with :func:`factory_signature`.
    """

    def record(factory):
        signature = inspect.signature(factory)
        # the non-finite policy (jaxopt_suite.nonfinite.nonfinite_option) is structural wherever it exists
        names = structural + (("nonfinite",) if "nonfinite" in signature.parameters
                              and "nonfinite" not in structural else ())
        unknown = [n for n in (*names, *init_only) if n not in signature.parameters]
        if unknown:
            raise TypeError(f"{factory.__name__} has no parameters {unknown} to declare static")

        @functools.wraps(factory)
        def checked(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs)
            if any(isinstance(v, StaticDefault) for v in bound.arguments.values()):
                for name, value in bound.arguments.items():
                    if isinstance(value, StaticDefault):
                        bound.arguments[name] = value.value
                args, kwargs = bound.args, bound.kwargs
            bound = bound.arguments
            for name in names:
                value = bound.get(name)
                # bool arrays are left to the factory (static_bool names them; a mask may be a bool array)
                if isinstance(value, jax.Array) and value.dtype != bool:
                    raise ValueError(
                        f"Invalid {name}: {value!r}; {name} is a structural argument of {factory.__name__} and "
                        "must be a Python value, but it arrived as a JAX array (optax.inject_hyperparams "
                        "injects every number and calls every callable as a schedule). Use "
                        f"jaxopt_suite.inject_hyperparams, which keeps it static, or list {name!r} in "
                        "static_args.")
            return factory(*args, **kwargs)

        setattr(checked, STATIC_ARGS_ATTR, tuple(names) + tuple(init_only))
        setattr(checked, INIT_ONLY_ATTR, tuple(init_only))
        checked.__signature__ = signature.replace(parameters=[
            p.replace(default=StaticDefault(p.default)) if p.name in names and _traced_by_optax(p.default)
            else p for p in signature.parameters.values()])
        return checked

    return record


class StaticDefault:
    """A structural argument's default as a :func:`declare_static` factory's signature shows it.

    ``optax.inject_hyperparams`` binds the defaults with the user's arguments and would trace a number or call
    a callable as a schedule; an object of this class is neither, so optax hands it back to the factory,
    which uses ``value``. ``repr`` is the default's, so ``help(factory)`` reads as written.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _traced_by_optax(value: Any) -> bool:
    """optax.inject_hyperparams injects numbers and arrays and calls callables; bools and the rest pass."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float, np.ndarray, jax.Array)) or callable(value)


def factory_signature(factory: Callable[..., Any]) -> inspect.Signature:
    """``factory``'s signature with its real defaults (no :class:`StaticDefault` wrappers)."""
    return inspect.signature(inspect.unwrap(factory))


def static_args_of(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The arguments of ``factory`` declared static with :func:`declare_static` (``()`` if none)."""
    return tuple(getattr(factory, STATIC_ARGS_ATTR, ()))


def inject_hyperparams(
    inner_factory: Callable[..., Any],
    static_args: Any = (),
    hyperparam_dtype: Optional[Any] = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``optax.inject_hyperparams`` that already knows the suite factories' static arguments.

    The rule: an argument is static when a traced value could not work or could not act. That is every
    structural option (keyword-only: integers that size the state or pick a branch, flags, callables that are
    not schedules, layouts; a traced one would make shapes or Python control flow depend on data) and the
    numbers a factory reads in ``init`` only (ELRA's ``learning_rate``, EnhancedSGD's ``q_epsilon``: injected,
    a change in ``state.hyperparams`` or a schedule would be silently ignored after the first step). The
    other numbers are the injected hyperparameters. Plain ``optax.inject_hyperparams(factory)`` works too
    while those structural options keep their defaults (see :func:`declare_static`); one passed as a number
    or callable raises a ``ValueError`` naming it and pointing here.

    The static arguments are those :func:`declare_static` recorded on ``inner_factory`` (for example
    AutoSGM's ``num_lrc`` and ``window``, ELRA's ``classes``, ADOPT's ``clip_value_fn``) followed by the
    user's ``static_args`` (a name or an iterable of names, added to them). Everything else follows optax:
    numbers and arrays are injected into ``state.hyperparams`` (change them there without recompiling),
    callables are schedules of the update count (0 at the first update), and floats are cast to the params'
    highest dtype or to ``hyperparam_dtype``. A factory without a declaration (an optax one, say) gets only
    the user's ``static_args``.

    Example::

        tx = jaxopt_suite.inject_hyperparams(jaxopt_suite.autosgm)(learning_rate=1e-2, num_lrc=1)
        state = tx.init(params)
        state.hyperparams["learning_rate"] = 5e-3   # takes effect at the next update
    """
    extra = (static_args,) if isinstance(static_args, str) else tuple(static_args)
    names = tuple(dict.fromkeys(static_args_of(inner_factory) + extra))
    return optax.inject_hyperparams(inner_factory, static_args=names, hyperparam_dtype=hyperparam_dtype)


class ScheduledState(NamedTuple):
    """State of a block whose ``learning_rate`` is a schedule: the update count and the block's state."""

    count: jax.Array
    inner_state: Any


def with_schedule(build: Callable[[Any], optax.GradientTransformationExtraArgs],
                  learning_rate: Any) -> optax.GradientTransformationExtraArgs:
    """``build(learning_rate)``, or, for a schedule, ``build(schedule(count))`` at every update.

    ``count`` is the number of previous ``update`` calls (0 at the first, one global count), as
    ``optax.scale_by_schedule`` and ``optax.inject_hyperparams`` count; the block is rebuilt per update
    around the scheduled value, so it behaves exactly as ``inject_hyperparams(factory)(learning_rate=
    schedule)``. The block is built once here with ``schedule(0)``, which validates every argument now.
    """
    if not callable(learning_rate):
        return build(learning_rate)
    first = build(learning_rate(0))

    def init_fn(params):
        return ScheduledState(count=jnp.zeros([], jnp.int32), inner_state=first.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        block = optax.with_extra_args_support(build(learning_rate(state.count)))
        updates, inner_state = block.update(updates, state.inner_state, params, **extra_args)
        return updates, ScheduledState(count=optax.safe_increment(state.count), inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# flat layout (used by the torch bridge; a static, hashable description of a packed buffer)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FlatLayout:
    """How several tensors are packed into one flat buffer.

    Segment ``i`` holds a tensor of ``numels[i]`` elements at ``offsets[i]``, zero-padded to
    ``padded[i]`` elements. Elements of the padding belong to the dead segment ``n`` (= ``len(numels)``),
    so per-segment vectors have ``n + 1`` entries.
    """

    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    padded: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def num_tensors(self) -> int:
        return len(self.numels)

    @property
    def num_segments(self) -> int:
        """Tensors plus the dead padding segment."""
        return len(self.numels) + 1

    @property
    def total(self) -> int:
        return (self.offsets[-1] + self.padded[-1]) if self.offsets else 0

    @functools.cached_property
    def seg_ids(self) -> np.ndarray:
        ids = np.full(self.total, self.num_tensors, dtype=np.int32)
        for i, (off, num) in enumerate(zip(self.offsets, self.numels)):
            ids[off : off + num] = i
        return ids

    @functools.cached_property
    def _key(self):
        return (self.offsets, self.numels, self.padded, self.shapes)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlatLayout) and self._key == other._key

    @classmethod
    def from_shapes(cls, shapes: Sequence[Sequence[int]], align_elements: int = 16) -> "FlatLayout":
        """Pack tensors of ``shapes`` back to back, each padded to a multiple of ``align_elements``."""
        offsets, numels, padded = [], [], []
        offset = 0
        for shape in shapes:
            numel = int(math.prod(shape))
            pad = -(-max(numel, 1) // align_elements) * align_elements
            offsets.append(offset)
            numels.append(numel)
            padded.append(pad)
            offset += pad
        return cls(tuple(offsets), tuple(numels), tuple(padded), tuple(tuple(s) for s in shapes))


def leaf_scalar(leaf: Any, segments: Optional[FlatLayout], dtype: Any = jnp.int32, fill: Any = 0):
    """A per-leaf scalar state entry: 0-d, or one entry per segment in the flat layout.

    ``leaf`` is only used for tree structure (this works on ``jax.ShapeDtypeStruct`` leaves).
    """
    del leaf
    if segments is None:
        return jnp.full((), fill, dtype=dtype)
    return jnp.full((segments.num_segments,), fill, dtype=dtype)


def per_element(scalar: jax.Array, segments: Optional[FlatLayout]) -> jax.Array:
    """Broadcast a per-leaf scalar (0-d, or per-segment vector) to the elements of its leaf."""
    if segments is None:
        return scalar
    return scalar[jnp.asarray(segments.seg_ids)]


def segment_sum(x: jax.Array, segments: FlatLayout) -> jax.Array:
    """Per-segment sums of a flat array (the per-tensor reduction of the flat layout)."""
    return jax.ops.segment_sum(
        x, jnp.asarray(segments.seg_ids), num_segments=segments.num_segments, indices_are_sorted=True
    )


def tensor_sum(x: jax.Array, segments: Optional[FlatLayout]) -> jax.Array:
    """Per-tensor sum: a 0-d sum in the pytree layout, per-segment sums in the flat layout."""
    if segments is None:
        return jnp.sum(x)
    return segment_sum(x, segments)


def leaf_masks(grad_mask: Optional[PyTree], updates: PyTree) -> PyTree:
    """A tree of per-leaf masks (None entries meaning all True) shaped like ``updates``."""
    if grad_mask is None:
        return jax.tree.map(lambda _: None, updates)
    return jax.tree.map(lambda _, m: m, updates, grad_mask, is_leaf=lambda x: x is None)


def where_mask(mask: Optional[jax.Array], new: Any, old: Any, segments: Optional[FlatLayout] = None):
    """``new`` where the mask is True, else ``old``; scalars and elements alike. ``mask=None``: ``new``.

    ``new`` may be per-element or per-leaf (0-d / per-segment) state; the mask is broadcast accordingly.
    """
    if mask is None:
        return new
    mask = jnp.asarray(mask, dtype=bool)
    new = jnp.asarray(new)
    if segments is not None and new.ndim == 1 and new.shape[0] != segments.num_segments:
        mask = per_element(mask, segments)
    return jnp.where(mask, new, old)


def masked_tree(grad_mask: Optional[PyTree], new: PyTree, old: PyTree, segments=None) -> PyTree:
    """Per-leaf :func:`where_mask` over matching trees (``None`` leaves of ``new`` are kept)."""
    if grad_mask is None:
        return new
    return jax.tree.map(
        lambda n, o, m: None if n is None else where_mask(m, n, o, segments),
        new,
        old,
        leaf_masks(grad_mask, new),
        is_leaf=lambda x: x is None,
    )


class EmptyState(NamedTuple):
    """State of a stateless block."""


def zero_masked(*, segments: Optional[FlatLayout] = None) -> optax.GradientTransformationExtraArgs:
    """Set the update of every entry whose ``grad_mask`` is False to exactly zero.

    The last block of every torch-semantics alias: together with the stateful blocks' own masking it
    makes a parameter without a gradient untouched (no decay, no state change), as torch does.
    """

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, *, grad_mask=None, **extra_args):
        del params, extra_args
        if grad_mask is None:
            return updates, state
        out = jax.tree.map(
            lambda u, m: jnp.where(per_element(jnp.asarray(m, bool), segments), u, jnp.zeros_like(u)),
            updates,
            leaf_masks(grad_mask, updates),
        )
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------------


def scalar_dtype_for(leaf_dtype: Any) -> Any:
    """float64 for float64/complex128 leaves, float32 otherwise (bias corrections, step sizes)."""
    return jnp.float64 if jnp.dtype(leaf_dtype) in (jnp.dtype("float64"), jnp.dtype("complex128")) else jnp.float32


def bias_correction(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - decay**count`` computed as ``-expm1(count * log1p(-(1 - decay)))``.

    Accurate to a few ulp even in float32 (the power form loses ~1e-5 relative at decay 0.999), and exactly
    ``1 - decay`` at ``count == 1``.
    """
    return bias_correction_from(one_minus(decay), count, dtype)


def safe_increment(count: jax.Array) -> jax.Array:
    """Elementwise ``count + 1`` saturating at the dtype maximum (optax's rule, for vectors too)."""
    return optax.safe_increment(count)


def real_dtype(dtype: Any) -> Any:
    """The real dtype of a (possibly complex) dtype."""
    return jnp.finfo(dtype).dtype


def cast_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.asarray(ref).dtype)


def tree_cast_like(tree: PyTree, ref: PyTree) -> PyTree:
    """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``ref`` (state dtype stability)."""
    return jax.tree.map(lambda x, r: None if x is None else x.astype(r.dtype), tree, ref, is_leaf=lambda x: x is None)


def get_hyperparams(state: PyTree) -> dict:
    """Return the hyperparameters of the first ``optax.inject_hyperparams`` state found in ``state``.

    ``state.hyperparams['learning_rate']`` holds the value used by the last update, scheduled or not.
    Raises ``ValueError`` when the state contains no injected hyperparameters.
    """
    found = []

    def visit(node):
        if found:
            return
        if isinstance(node, optax.InjectHyperparamsState) or (
            hasattr(node, "hyperparams") and isinstance(getattr(node, "hyperparams"), dict)
        ):
            found.append(node.hyperparams)
            return
        if isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, (tuple, list)):
            for value in node:
                visit(value)

    visit(state)
    if not found:
        raise ValueError("The state contains no optax.inject_hyperparams state; wrap the optimizer with it.")
    return dict(found[0])


def chain(*blocks: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``optax.chain`` with ``None`` entries dropped (for optional blocks such as maximize)."""
    return optax.chain(*[b for b in blocks if b is not None])


def add_coupled_weight_decay(weight_decay: Any, mask: Any = None) -> optax.GradientTransformation:
    r"""Coupled L2 as ``torch.optim`` adds it: ``g ← g + λ p``, and ``g`` unchanged when ``λ = 0``.

    torch skips the term when ``weight_decay == 0``, so an infinite parameter does not turn into
    ``0 · inf = NaN``; this reproduces that with ``where(λ == 0, g, g + λ p)`` (pure and traceable, λ may be
    an injected hyperparameter). For λ ≠ 0 the result is bit-identical to ``optax.add_decayed_weights``.
    ``mask``: optional bool pytree (or callable of params) selecting decayed leaves.
    """
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the params (pass params to update).")
        wd = jnp.asarray(weight_decay) if not isinstance(weight_decay, (int, float)) else weight_decay

        def one(g, p):
            if g is None:
                return None
            if isinstance(wd, (int, float)):
                return g if wd == 0 else g + wd * p
            # traced λ (injected, or the bridge's per-step hyperparameters): the select keeps torch's skip;
            # it changes how XLA fuses the step, so results agree with a Python λ to rounding, not bitwise
            return jnp.where(wd == 0, g, g + wd * p)
        return jax.tree.map(one, updates, params), state

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def maybe_maximize(maximize: bool) -> Optional[optax.GradientTransformation]:
    """``scale(-1)`` when maximizing (applied first, before any decay, as torch does)."""
    return optax.scale(-1.0) if maximize else None


def static_bool(name: str, value: Any) -> bool:
    """Structure-changing flags must be Python bools (never traced): ``"no"``, ``1`` or ``None`` raise
    ``TypeError`` naming the flag (``bool("no")`` would be True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool (True or False; it changes the computation), "
                        f"got {value!r}.")
    return bool(value)


Schedule = Callable[[jax.Array], jax.Array]


def one_minus(decay: Any) -> Any:
    """``1 - decay`` in Python double when ``decay`` is a Python number (as torch forms it), else traced.

    The moment updates and :func:`bias_correction` must use the *same* rounded value, so that the bias
    correction at step 1 is exactly the weight the first gradient received.
    """
    if isinstance(decay, (int, float, np.floating, np.integer)) and not isinstance(decay, bool):
        return 1.0 - float(decay)
    return 1 - jnp.asarray(decay)


def bias_correction_from(one_minus_decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - (1 - c)**count`` as ``-expm1(count * log1p(-c))`` with ``c = one_minus_decay``."""
    c = jnp.asarray(one_minus_decay, dtype)
    return -jnp.expm1(count.astype(dtype) * jnp.log1p(-c))


def lerp(start: jax.Array, end: jax.Array, weight: Any) -> jax.Array:
    """``start + weight * (end - start)`` rounded as torch's ``lerp`` (two formulas split at 0.5)."""
    diff = end - start
    weight = jnp.asarray(weight).astype(real_dtype(start.dtype)) if not isinstance(weight, float) else weight
    low = start + weight * diff
    high = end - diff * (1 - weight)
    if isinstance(weight, float):
        return low if abs(weight) < 0.5 else high
    return jnp.where(jnp.abs(weight) < 0.5, low, high)


def componentwise(fn: Callable[..., Any], *arrays: jax.Array):
    """Apply ``fn`` to real arrays; complex arrays are split into (real, imag) components first.

    torch steps a complex parameter as its ``view_as_real`` pair, so elementwise nonlinear rules
    (square, square root, maximum, division) act on each component separately. ``fn`` may return a
    single array or a tuple of arrays.
    """
    if not any(jnp.iscomplexobj(a) for a in arrays if a is not None and hasattr(a, "dtype")):
        return fn(*arrays)

    def split(a, part):
        if a is None or not hasattr(a, "dtype") or not jnp.iscomplexobj(a):
            return a
        return jnp.real(a) if part == 0 else jnp.imag(a)

    re = fn(*[split(a, 0) for a in arrays])
    im = fn(*[split(a, 1) for a in arrays])
    if isinstance(re, tuple):
        return tuple(jax.lax.complex(r, i) for r, i in zip(re, im))
    return jax.lax.complex(re, im)


def ordered_after(token: jax.Array, value: Any) -> Any:
    """``value`` unchanged, but computed after the scalar ``token`` exists (a data dependence for XLA).

    ``(token != token) >> 1`` is always 0 (NaN tokens included), which XLA cannot prove, so the select
    below never picks its first branch and costs nothing per element; it only orders the consumer of
    ``value`` after ``token``'s producers. XLA:CPU otherwise copies a donated buffer that one pass reads
    and another, unordered, pass overwrites in place; making the overwriting pass depend on a scalar
    produced by (or after) the reading pass removes the copy.
    """
    never = jnp.right_shift((jnp.asarray(token) != token).astype(jnp.int32), 1) != 0
    return jnp.where(never, jnp.zeros_like(value), value)


# --------------------------------------------------------------------------------------------------
# per-leaf scalars stacked in one vector (pytree layout): one state buffer instead of one per leaf
# --------------------------------------------------------------------------------------------------

#: Class attribute of a state ``NamedTuple`` naming its fields that hold per-leaf scalars stacked by
#: :func:`stacked_leaf_scalars`. Code that maps state to parameters (the torch bridge) reads it to tell
#: such a vector (entry ``i`` belongs to leaf ``i``) from a global state vector.
STACKED_FIELDS_ATTR = "stacked_leaf_fields"


def stacked_leaf_scalars(tree: PyTree, segments: Optional[FlatLayout], dtype: Any = jnp.int32, fill: Any = 0):
    """Per-leaf scalars of ``tree`` kept together: one vector, entry ``i`` for leaf ``i`` of ``tree``.

    In the pytree layout this is a single 1-D array of ``len(jax.tree.leaves(tree))`` entries (in leaf
    order), so a jitted step has one small input and output buffer and one kernel for them, instead of
    one 0-d buffer and kernel per leaf, which dominated the step overhead with hundreds of small tensors.
    In the flat layout it is, as :func:`leaf_scalar`, a tree of per-segment vectors.
    """
    if segments is not None:
        return jax.tree.map(lambda leaf: leaf_scalar(leaf, segments, dtype, fill), tree)
    return jnp.full((len(jax.tree.leaves(tree)),), fill, dtype=dtype)


def stacked_leaf_mask(grad_mask: Optional[PyTree], tree: PyTree) -> Optional[jax.Array]:
    """``grad_mask`` (bool scalar per leaf of ``tree``, ``None`` meaning True) as one bool vector, or ``None``."""
    if grad_mask is None:
        return None
    masks = jax.tree.leaves(leaf_masks(grad_mask, tree), is_leaf=lambda x: x is None)
    if not masks:
        return None
    return jnp.stack([jnp.ones((), bool) if m is None else jnp.asarray(m, bool).reshape(()) for m in masks])


def masked_stacked(grad_mask: Optional[PyTree], new: Any, old: Any, tree: PyTree,
                   segments: Optional[FlatLayout] = None) -> Any:
    """:func:`masked_tree` for state made by :func:`stacked_leaf_scalars`: ``old`` where the mask is False."""
    if segments is not None:
        return masked_tree(grad_mask, new, old, segments)
    mask = stacked_leaf_mask(grad_mask, tree)
    return new if mask is None else jnp.where(mask, new, old)


def stacked_leaf_map(
    fn: Callable[[jax.Array, Any], tuple[jax.Array, ...]],
    stacked: Any,
    dtypes: PyTree,
    segments: Optional[FlatLayout] = None,
) -> tuple[PyTree, ...]:
    """Evaluate an elementwise ``fn(scalars, dtype) -> tuple of arrays`` on stacked per-leaf scalars.

    ``stacked`` comes from :func:`stacked_leaf_scalars`; ``dtypes`` is a pytree giving each leaf's result
    dtype. ``fn`` runs once per distinct dtype on the whole vector (a few entries per tensor, so one small
    kernel), and leaf ``i`` gets entry ``i``; consumers fuse that indexing into their own loops. In the
    flat layout it runs on each leaf's per-segment vector. Returns one pytree per output of ``fn``,
    structured like ``dtypes``.
    """
    if segments is not None:  # one per-segment vector per flat leaf: fn runs on each
        leaves, treedef = jax.tree.flatten(stacked)
        outputs = [tuple(fn(v, d)) for v, d in zip(leaves, treedef.flatten_up_to(dtypes))]
    else:
        leaf_dtypes, treedef = jax.tree.flatten(dtypes)
        by_dtype = {jnp.dtype(d): None for d in leaf_dtypes}
        for dtype in by_dtype:
            by_dtype[dtype] = tuple(fn(stacked, dtype))
        outputs = [tuple(out[i] for out in by_dtype[jnp.dtype(d)]) for i, d in enumerate(leaf_dtypes)]
    if not outputs:  # an empty tree: as many empty trees as fn has outputs
        return tuple(treedef.unflatten([]) for _ in fn(jnp.zeros((0,), jnp.int32), jnp.float32))
    return tuple(treedef.unflatten([o[k] for o in outputs]) for k in range(len(outputs[0])))
