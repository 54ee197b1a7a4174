"""``JaxOptimizer``: any registry optimizer as a real ``torch.optim.Optimizer``.

The math runs in JAX (one compiled step per buffer, shared across instances); the parameters and
gradients stay torch tensors that JAX reads through DLPack without copies.

How a step works (flat path, the default)
-----------------------------------------
* Per param group and per (dtype, device), the parameters are packed into one flat torch buffer; each
  parameter is a segment padded with zeros to 64 bytes (:class:`jaxopt_suite.FlatLayout`). ``p.data``
  is re-pointed to a view of the flat parameter buffer (``id(p)`` does not change); a flat gradient buffer
  of the same layout holds the gradients the step reads. Both buffers are imported into JAX once.
* Gradients follow torch exactly: a parameter is stepped iff ``p.grad is not None`` at ``step()``, and
  ``p.grad`` is None wherever torch leaves it None (before the first backward, after
  ``zero_grad(set_to_none=True)``, for parameters that got no gradient). A parameter whose ``.grad`` is
  None is skipped as torch skips it (no decay, no state change, per-parameter step counts); the mask is
  read from ``p.grad`` at each step, so every way of producing gradients counts: backward (with
  accumulation over micro-batches), ``p.grad = g``, in-place ``p.grad.copy_/add_``, ``autograd.grad`` or
  ``torch.func`` results, GradScaler's unscale, ``clip_grad_norm_``, DDP's views.
* At ``step()`` each non-None ``.grad`` that is not already its segment of the flat gradient buffer (same
  data pointer, dtype, shape and strides) is copied in, all together with one ``torch._foreach_copy_``,
  and ``p.grad`` is re-pointed to its segment (values unchanged). Cost: at most one copy of the gradients
  per step. The default loop ``zero_grad(); backward(); step()`` pays it (torch allocates fresh ``.grad``
  tensors after ``set_to_none=True``); accumulation into a ``.grad`` that already is a segment -- the
  second micro-batch, ``zero_grad(set_to_none=False)`` -- is zero-copy, and so is a ``.grad`` assigned once
  and then edited in place.
* Sparse gradients raise ``RuntimeError`` at ``step()``, naming the parameter, before any parameter
  changes. A tensor hook per trainable parameter notes a sparse gradient even when autograd accumulates it
  into a dense ``.grad`` (which would densify it silently); it only reads the layout.
* While every segment of a buffer is stepped together (and the optimizer is elementwise) the buffer runs
  in *uniform mode*: the flat buffer is an ordinary one-leaf pytree. The first time some parameter is
  skipped, the buffer switches for good to *segment mode*: the factory gets ``segments=FlatLayout`` and a
  ``grad_mask`` with one entry per segment.
* Numeric hyperparameters are read from the group at every step (``float(...)``, so a tensor lr works)
  and passed to the jitted step as traced arguments: schedulers never cause recompiles, and instances
  that differ only in such values share one compiled step (integers a factory reads in ``init`` only,
  such as a seed, are traced too). Structural
  options (maximize, amsgrad, nesterov...) are static; changing one rebuilds the state once through the
  torch-side state.
* The new parameters land in a donated JAX-owned scratch buffer and are written back with one
  ``copy_`` into the flat torch buffer (whose data pointer therefore never changes).

Parameters that are views, overlap another parameter, are not contiguous, or groups of several dtypes
for an optimizer that is not elementwise, use the *simple path*: a per-parameter pytree imported at
each step and written back with ``copy_`` (same results, slower with many tensors). ``flat=False``
forces it.

The JAX state is a cache; the torch-side state is what users see and edit. ``self.state[p]`` shows a
torch-format snapshot of ``p``'s state, refreshed lazily on read after a step (reading ``state[p]`` copies
``p``'s state once; iterating over ``self.state`` or ``state_dict()`` refreshes every entry). Each
parameter's entry dict stays the same object across refreshes, its tensors are fresh copies. Edits take
effect at the next step, as in torch: assigning ``state[p][key] = t``, in-place edits of a tensor read from
it (``state[p]["exp_avg"].zero_()``), deleting an entry (the parameter starts afresh) or replacing
``self.state`` altogether. At export the bridge remembers the objects it handed out and their ``_version``
counters; at ``step()``, if one was reassigned or changed in place, the other snapshots are brought up to
date, the edits kept, and the JAX state is rebuilt from the torch-side state (the path ``load_state_dict``,
unpickling and ``copy.deepcopy`` take). A tensor read before a step is a snapshot of then: editing it after
that step still takes effect (its values are used) with a ``UserWarning``. Group-level entries written by
the export (e.g. Lookahead's ``lookahead_step``, ``"jax_state"``) are not watched: they are read back when
the JAX state is rebuilt (``load_state_dict``, or an edit of some parameter's state).
``state_dict()`` is a snapshot: its tensors are copies (torch's state dict holds live references), so that
an optimizer loading it, which mutates what it loads, cannot edit this one's state.

``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` (and subclasses' overrides) run outside
``torch.compile``: dynamo calls them eagerly, so a compiled function may call ``opt.step()`` and a
compiled model trains with the bridge.

``load_state_dict`` checks the loaded state before anything is replaced (:func:`validate_loaded_state`, one
check for every class: each class only describes what it keeps, :meth:`JaxOptimizer._load_spec`; the generic
description is the JAX ``init`` of the loaded groups traced with ``jax.eval_shape``). A ``ValueError`` names
the param group, the parameter (position in the group and shape) and the key for another optimizer's state
dict (its groups lack options this class needs), a missing or unknown per-parameter key, a wrong shape, a
value of the wrong kind or dtype (floating state is cast to the parameter's dtype first, as torch casts it).
torch's own errors for param-group count and size mismatches are kept. Where torch.optim accepts silently
(SGD's ``momentum_buffer`` missing or None: "not started"; a key of the class this configuration does not
use; a state entry of no parameter) the bridge does the same with a ``UserWarning``.

Every param group is validated when it is added (at construction and by ``add_param_group``; a group that fails
is not added): :meth:`JaxOptimizer._check_group` runs the bridge's type, flag and finiteness checks (stricter
than torch.optim; the named classes run torch's own checks, with torch's messages, first) and then builds the
group's JAX transformation once, so the registry factory's range checks run at construction. The generic
``JaxOptimizer(params, "name", **kw)`` validates the same way through the entry's factory. Values changed in a
group later (schedulers) are not checked.

Writing a subclass (one torch-style class per registry entry)
-------------------------------------------------------------
A subclass maps torch-style arguments to a registry entry::

    class MyOpt(JaxOptimizer):
        entry_name = "my_entry"                  # registry name, or a hashable factory callable with optional
                                                 #   requires_value / supports_segments attributes
        state_keys = {"step": "MyState.count",   # torch state key -> JAX state field; a field is named
                      "exp_avg": "mu"}           #   "field" or "StateClass.field" (first match wins)
        presence_fields = ()                     # per-param counters without a torch key: 1 if the param
                                                 #   has torch state else 0 (SGD's momentum count)
        group_state_keys = {}                    # torch group key -> JAX field of a global (not per-param)
                                                 #   state leaf, e.g. {"lookahead_step": "LookaheadState.count"}
        elementwise = True                       # no per-tensor reductions: uniform mode allowed and
                                                 #   buffers may be split by dtype
        group_flag_defaults = {"maximize": False}  # setdefault'ed in __setstate__ (old checkpoints)
        _persistent_attrs = ()                   # extra instance attributes kept by pickle / deepcopy

        def __init__(self, params, lr=1e-3, beta=0.9, *, maximize=False):
            if not 0.0 <= lr: raise ValueError(f"Invalid learning rate: {lr}")
            super().__init__(params, defaults=dict(lr=lr, beta=beta, maximize=maximize))

        def _hyperparams(self, group):           # traced: read with float() at every step
            return {"learning_rate": float(group["lr"]), "b1": float(group["beta"])}

        def _static_config(self, group):         # static: hashable Python values (recompile on change)
            return {"maximize": bool(group["maximize"])}

Unmapped per-parameter state fields are saved under their field path (e.g. ``"ScaleState.nu"``) and
unmapped global leaves under the group key ``"jax_state"``, so nothing is lost in a checkpoint. Entries
with ``requires_value`` get the loss: from ``step(closure)`` (the closure's return value) or from
``step(value=loss)``; a missing loss raises. ``_state_value_to_torch`` converts per-param scalars
(``step`` becomes a 0-d float32 tensor as in torch) and may be overridden. Per-parameter subtrees of
the JAX state are recognised by their structure (shaped like the params list), and so are the fields a
state class lists in ``stacked_leaf_fields`` (one scalar per parameter stacked in one vector, see
:func:`jaxopt_suite._common.stacked_leaf_scalars`): entry ``i`` is parameter ``i``'s value.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import warnings
import weakref
from typing import Any, ClassVar, Hashable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxopt_suite import checkpoint as _ckpt
from jaxopt_suite import registry
from jaxopt_suite._common import INIT_ONLY_ATTR, FlatLayout, factory_signature
from jaxopt_suite.nonfinite import EXTERNAL_FLAG, check_nonfinite, skip_nonfinite

from . import _validate as V
from . import dlpack

__all__ = ["JaxOptimizer", "LoadSpec", "StateSlot", "StepSpec", "compiled_init_cache_size",
           "compiled_step_cache_size", "entry_info", "raise_if_nonfinite", "validate_loaded_state"]

SIMPLE_PATH_WARN_LEAVES = 400


# --------------------------------------------------------------------------------------------------
# compiled functions, shared by every instance (static arguments: entry, structure, layout)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a compiled step: registry entry, structural kwargs and flat layout."""

    entry: Any  # a registry name, or a hashable factory callable (kwargs -> transformation)
    static: tuple[tuple[str, Hashable], ...]
    segments: Optional[FlatLayout] = None

    def transformation(self, hyper: Mapping[str, Any]):
        build = registry.get(self.entry).build if isinstance(self.entry, str) else self.entry
        kwargs = dict(self.static)
        # the non-finite policy wraps whatever the entry builds (a registry factory, Lookahead's or
        # AutoSGM's bridge factory): "skip" here, "raise" is checked in torch by JaxOptimizer.step
        policy = kwargs.pop("nonfinite", "propagate")
        kwargs.update(hyper)
        if self.segments is not None:
            kwargs["segments"] = self.segments
        tx = build(**kwargs)
        if policy == "skip":
            tx = skip_nonfinite(tx, segments=self.segments, check_value=entry_info(self.entry)[0])
        return tx


def entry_info(entry) -> tuple[bool, bool]:
    """``(requires_value, supports_segments)`` of a registry name or a factory callable.

    A factory callable may carry ``requires_value`` / ``supports_segments`` attributes (default False/True).
    """
    if isinstance(entry, str):
        e = registry.get(entry)
        return e.requires_value, e.supports_segments
    return bool(getattr(entry, "requires_value", False)), bool(getattr(entry, "supports_segments", True))


@functools.partial(jax.jit, static_argnames=("spec",))
def _compiled_init(params, hyper, *, spec: StepSpec):
    return spec.transformation(hyper).init(params)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0, 1), keep_unused=True)
def _compiled_step(scratch, state, params, grads, hyper, grad_mask, value, flag=None, *, spec: StepSpec):
    # ``scratch`` is unused on purpose: it is donated so that the new params reuse its memory.
    del scratch
    extra = {}
    if grad_mask is not None:
        extra["grad_mask"] = grad_mask
    if value is not None:
        extra["value"] = value
    if flag is not None:  # nonfinite="skip" over several compiled steps: the decision made over all of them
        extra[EXTERNAL_FLAG] = flag
    updates, new_state = spec.transformation(hyper).update(grads, state, params, **extra)
    new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    return new_params, new_state


# the jitted steps and inits of every bridge class (ELRA and EnhancedSGD register their own)
_STEP_FUNCTIONS = [_compiled_step]
_INIT_FUNCTIONS = [_compiled_init]


def compiled_step_cache_size() -> int:
    """Number of compiled step executables of all bridge classes (all instances share them); tests count
    recompiles with it: instances that differ only in numeric hyperparameters (or a seed) add none."""
    return sum(f._cache_size() for f in _STEP_FUNCTIONS)


def compiled_init_cache_size() -> int:
    """Number of compiled state initialisations of all bridge classes (shared like the steps)."""
    return sum(f._cache_size() for f in _INIT_FUNCTIONS)


# --------------------------------------------------------------------------------------------------
# state walking: which leaves are per-parameter, which are global
# --------------------------------------------------------------------------------------------------


# The walk itself is shared with the cross-framework conversions (jaxopt_suite.checkpoint): one
# implementation of "which state leaves are per parameter" for the bridge and for checkpoints.
_walk_state = _ckpt.walk_state
_rebuild_state = _ckpt.rebuild_state
_is_stacked = _ckpt.is_stacked
_field_matches = _ckpt.field_matches


def _path_name(path: tuple[str, ...]) -> str:
    """Auto key for an unmapped field: the innermost ``State.field`` (full path only if needed)."""
    return "/".join(path)


def _torch_dtype_of(array) -> torch.dtype:
    return dlpack.to_torch(jnp.zeros((), array.dtype)).dtype


# --------------------------------------------------------------------------------------------------
# load_state_dict validation: what a loaded state dict must hold, checked before anything is replaced
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StateSlot:
    """One state value ``load_state_dict`` expects: a tensor shaped like its parameter (``element``) or a
    scalar / small array of the JAX state (``shape`` and ``dtype`` of the JAX leaf)."""

    shape: tuple
    dtype: Any
    element: bool = False


@dataclasses.dataclass
class LoadSpec:
    """What the optimizer keeps for a configuration (see :meth:`JaxOptimizer._load_spec`).

    ``per_param[g][j]``: ``{key: StateSlot}`` of parameter ``j`` of group ``g`` (``None``: keeps no state).
    ``vocabulary``: keys the class keeps under some configuration (kept and ignored when this one does not use
    them, as torch.optim does). ``optional``: keys whose absence torch.optim reads as "not started yet" (value:
    what happens then). ``globals_``: non-parameter entries of ``state`` (``{name: {key: StateSlot}}``), which
    must be there when some parameter has state if ``globals_required``. ``group_slots[g]``: group-level JAX
    state (``{group key: StateSlot}``; ``("jax_state", name)`` for the unmapped leaves under ``"jax_state"``).
    """

    per_param: list
    vocabulary: frozenset = frozenset()
    optional: Mapping[str, str] = dataclasses.field(default_factory=dict)
    globals_: Mapping[Hashable, Mapping[str, StateSlot]] = dataclasses.field(default_factory=dict)
    globals_required: bool = False
    group_slots: list = dataclasses.field(default_factory=list)


# (``nonfinite_skips``: state kept in the group, present once a nonfinite="skip" step has run)
_GROUP_KEYS_NOT_OPTIONS = ("params", "param_names", "nonfinite_skips")
#: group options every bridge class has (filled in for state dicts saved before they existed)
_BASE_GROUP_DEFAULTS = {"nonfinite": "propagate"}
#: group keys of the global state leaves every class may have: the nonfinite="skip" counter
_BASE_GROUP_STATE_KEYS = {"nonfinite_skips": "SkipNonFiniteState.skips"}


@functools.lru_cache(maxsize=None)
def _jax_dtype_for(dtype: torch.dtype):
    return dlpack.to_jax(torch.zeros((), dtype=dtype)).dtype


def jax_shapes(params) -> list:
    """``jax.ShapeDtypeStruct`` per torch parameter (for ``jax.eval_shape`` of an ``init``)."""
    return [jax.ShapeDtypeStruct(tuple(p.shape), _jax_dtype_for(p.dtype)) for p in params]


def _host_template(tree):
    """``tree`` of ShapeDtypeStructs as zero-stride NumPy arrays (no memory), so that the state walk works."""
    return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), tuple(s.shape)), tree)


def _warn_user(message: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside torch_bridge and torch (the user's load)."""
    import os
    import sys

    skip = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _kind(dtype) -> str:
    """'b', 'i', 'u', 'f' or 'c' for a torch or NumPy/JAX dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bool:
            return "b"
        if dtype.is_complex:
            return "c"
        if dtype.is_floating_point:
            return "f"
        return "u" if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else "i"
    if jnp.issubdtype(dtype, jnp.bool_):
        return "b"
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return "c"
    if jnp.issubdtype(dtype, jnp.floating):
        return "f"
    return "u" if jnp.issubdtype(dtype, jnp.unsignedinteger) else "i"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _slot_problem(value, slot: StateSlot) -> Optional[str]:
    """Why ``value`` cannot be loaded into ``slot`` (None if it can), phrased after the key."""
    if slot.element:
        if not torch.is_tensor(value):
            return f"is a {type(value).__name__}, expected a tensor of shape {slot.shape}"
        if tuple(value.shape) != tuple(slot.shape):
            return f"has shape {tuple(value.shape)}, expected {tuple(slot.shape)} (the parameter's shape)"
        if _kind(value.dtype) not in ("f", _kind(slot.dtype)):
            return f"has dtype {_dtype_name(value.dtype)}, expected {_dtype_name(slot.dtype)}"
        return None
    if torch.is_tensor(value):
        shape, kind, dtype = tuple(value.shape), _kind(value.dtype), value.dtype
    elif isinstance(value, (bool, int, float, np.number, np.bool_)):
        arr = np.asarray(value)
        shape, kind, dtype = (), arr.dtype.kind, arr.dtype
    else:
        return f"is a {type(value).__name__}, expected a number or a tensor of shape {tuple(slot.shape)}"
    want = _kind(slot.dtype)
    wanted = f"expected {_dtype_name(slot.dtype)}"
    if shape != tuple(slot.shape):
        return f"has shape {shape}, expected {tuple(slot.shape)}"
    ok = {"f": ("f", "i", "u"), "i": ("i", "u", "f"), "u": ("u", "i"), "b": ("b", "i", "u"), "c": ("c", "f", "i", "u")}
    if kind not in ok[want]:
        return f"has dtype {_dtype_name(dtype)}, {wanted}"
    if want in ("i", "u", "b") and kind != want:
        host = value.detach().cpu().double().numpy() if torch.is_tensor(value) else np.asarray(value, np.float64)
        if not np.all(np.isfinite(host)) or not np.all(host == np.round(host)):
            return f"holds non-integral values (dtype {_dtype_name(dtype)}), {wanted}"
        if want == "b" and not np.all((host == 0) | (host == 1)):
            return f"holds values other than 0 and 1, {wanted}"
        if want == "u" and np.any(host < 0):
            return f"holds negative values, {wanted}"
    return None


def reject_complex_state(opt, state_dict) -> None:
    """Refuse complex tensors saved for real parameters, before torch's ``load_state_dict`` casts them.

    torch.optim casts every loaded tensor to its (floating) parameter's dtype; for a complex tensor that
    cast silently drops the imaginary part, so it is a ``ValueError`` naming the group, parameter and key.
    Malformed dicts are left to the later checks (torch's own and :func:`validate_loaded_state`).
    """
    try:
        saved_groups, state = state_dict["param_groups"], state_dict["state"]
    except (TypeError, KeyError):
        return
    where = f"{type(opt).__name__}.load_state_dict"
    for gi, (saved, cur) in enumerate(zip(saved_groups, opt.param_groups)):
        if not isinstance(saved, Mapping):
            continue
        for j, (pid, p) in enumerate(zip(saved.get("params", ()), cur["params"])):
            st = state.get(pid) if isinstance(state, Mapping) else None
            if not isinstance(st, Mapping) or p.is_complex():
                continue
            for key, value in st.items():
                if torch.is_tensor(value) and value.is_complex():
                    raise ValueError(f"{where}: parameter {j} of param group {gi} (shape {tuple(p.shape)}): state "
                                     f"{key!r} has dtype {_dtype_name(value.dtype)}, expected "
                                     f"{_dtype_name(p.dtype)} (the parameter is real; casting would drop the "
                                     "imaginary part)")


def validate_loaded_state(opt, state, param_groups) -> None:
    """Check a state dict that ``opt.load_state_dict`` is loading, before the optimizer's state is replaced.

    ``state`` / ``param_groups`` are what torch's ``load_state_dict`` hands to ``__setstate__``: the state
    keyed by the optimizer's own parameters (floating tensors already cast to their parameter's dtype, as
    torch casts them), the saved groups with the current ``params``. Raises ``ValueError`` naming the group,
    the parameter (position in its group and shape) and the key for: a group without an option the class
    needs (another optimizer's state dict), a missing or unknown per-parameter key, a wrong shape, a value
    of the wrong kind or dtype. Emits ``UserWarning`` where torch.optim accepts silently (a key torch reads
    as "not started yet" missing; a key of the class that this configuration does not use; a state entry
    that belongs to no parameter). May normalise ``state`` in place (drops such "not started" keys).
    """
    cls = type(opt).__name__
    where = f"{cls}.load_state_dict"
    flag_defaults = {**_BASE_GROUP_DEFAULTS, **dict(getattr(opt, "group_flag_defaults", {}) or {})}
    groups = []
    for gi, (new, cur) in enumerate(zip(param_groups, opt.param_groups)):
        absent = sorted(k for k in cur if k not in new and k not in _GROUP_KEYS_NOT_OPTIONS)
        extra = sorted(k for k in new if k not in cur and k not in _GROUP_KEYS_NOT_OPTIONS)
        # options with a default are filled in (older checkpoints, torch.optim.ASGD's into the bridge's ASGD,
        # which adds 'momentum'); options absent *and* foreign ones mean another optimizer's groups
        missing = absent if extra else [k for k in absent if k not in flag_defaults]
        if missing:
            also = f", and has {extra}, which they have not" if extra else ""
            raise ValueError(f"{where}: param group {gi} of the state dict has no {missing}, which {cls}'s "
                             f"param groups have{also}: the state dict was saved by another optimizer")
        g = dict(new)
        for k, v in flag_defaults.items():
            g.setdefault(k, v)
        groups.append(g)
    spec = opt._load_spec(groups)

    owned = {}
    any_state = False
    for gi, g in enumerate(groups):
        for j, p in enumerate(g["params"]):
            owned[id(p)] = (gi, j)
            slots = spec.per_param[gi][j]
            st = state.get(p)
            label = f"parameter {j} of param group {gi} (shape {tuple(p.shape)})"
            if st is None:
                continue
            if not isinstance(st, Mapping):
                raise ValueError(f"{where}: the state of {label} is a {type(st).__name__}, expected a dict")
            if slots is None:
                if st:
                    _warn_user(f"{where}: {label} has state {sorted(map(str, st))}, but {cls} keeps none for "
                               "it (it is not trained); kept and unused, as torch.optim does")
                continue
            absent = [k for k in slots if k not in st or st[k] is None]
            optional = [k for k in absent if k in spec.optional]
            for k in optional:
                _warn_user(f"{where}: {label} has no state {k!r}; {spec.optional[k]}")
                if k in st:
                    del st[k]
            if not st:
                continue  # never stepped (torch's format: no entry, or an empty one): starts fresh
            any_state = True
            required = [k for k in absent if k not in spec.optional]
            if required:
                raise ValueError(f"{where}: {label}: state {required[0]!r} is missing (the state has "
                                 f"{sorted(map(str, st))}; {cls} with this configuration keeps {sorted(slots)})")
            for key in st:
                if key in slots:
                    problem = _slot_problem(st[key], slots[key])
                    if problem:
                        raise ValueError(f"{where}: {label}: state {key!r} {problem}")
                elif key in spec.vocabulary:
                    _warn_user(f"{where}: {label}: state {key!r} is not used by {cls} with this configuration "
                               f"(it keeps {sorted(slots)}); kept and ignored, as torch.optim does")
                else:
                    raise ValueError(f"{where}: {label}: unknown state {key!r}, which {cls} does not keep (with "
                                     f"this configuration it keeps {sorted(slots)}): the state dict was saved "
                                     "by another optimizer or altered")
    for name in list(state):
        if id(name) in owned:
            continue
        if name in spec.globals_:
            entry, slots = state[name], spec.globals_[name]
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: state entry {name!r} is a {type(entry).__name__}, expected a dict")
            for key in slots:
                if key not in entry:
                    raise ValueError(f"{where}: state entry {name!r}: key {key!r} is missing")
            for key, value in entry.items():
                if key not in slots:
                    raise ValueError(f"{where}: state entry {name!r}: unknown key {key!r} (expected "
                                     f"{sorted(slots)})")
                problem = _slot_problem(value, slots[key])
                if problem:
                    raise ValueError(f"{where}: state entry {name!r}: {key!r} {problem}")
        else:
            _warn_user(f"{where}: state entry {name!r} belongs to no parameter of the optimizer; kept and "
                       "unused, as torch.optim does")
    if spec.globals_required and any_state:
        for name in spec.globals_:
            if name not in state:
                raise ValueError(f"{where}: the parameters have state but the state entry {name!r} "
                                 f"({cls}'s global state) is missing")
    for gi, (g, slots) in enumerate(zip(groups, spec.group_slots)):
        extra = g.get("jax_state")
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(f"{where}: param group {gi}: 'jax_state' is a {type(extra).__name__}, expected a dict")
        known = {name for kind, name in (k for k in slots if isinstance(k, tuple))}
        for name in (extra or {}):
            if name not in known:
                raise ValueError(f"{where}: param group {gi}: unknown 'jax_state' key {name!r} (expected "
                                 f"{sorted(known)})")
        for key, slot in slots.items():
            if isinstance(key, tuple):
                if extra and key[1] in extra:
                    value, label = extra[key[1]], f"'jax_state' key {key[1]!r}"
                else:
                    continue
            elif key in g:
                value, label = g[key], f"{key!r}"
            else:
                continue
            problem = _slot_problem(value, slot)
            if problem:
                raise ValueError(f"{where}: param group {gi}: {label} {problem}")


# --------------------------------------------------------------------------------------------------
# buffers: one flat buffer per (group, dtype, device), or one simple (per-tensor) set per group
# --------------------------------------------------------------------------------------------------


class _Buffer:
    """Common part of flat and simple buffers: params, per-step grad marks, JAX state and its torch view."""

    flat: bool = False

    def __init__(self, params: list[torch.Tensor], labels: Optional[list[str]] = None, watch: bool = True):
        self.params = params
        n = len(params)
        self.labels = labels or [f"parameter {i} (shape {tuple(p.shape)})" for i, p in enumerate(params)]
        self.stepped = np.zeros(n, dtype=bool)  # has torch-side state
        self.marks = np.zeros(n, dtype=bool)  # ``p.grad is not None`` at this step (set by sync_grads)
        self.sparse_seen = np.zeros(n, dtype=bool)  # a sparse gradient arrived since the last zero_grad
        self.state = None  # JAX state (cache); None = rebuild from torch state
        self.spec: Optional[StepSpec] = None
        self.stale_idx = np.zeros(n, dtype=bool)  # per param: torch-side snapshot older than the JAX state
        # i -> (entry dict, {key: (value, value._version or None)}) as the last export handed them out
        self.handed: dict = {}
        self._export_cache = None  # (state, per-param fields, host views) of the last export; dropped at step
        self.hooks = _watch_sparse(self, params) if watch else []

    @property
    def stale(self) -> bool:
        """Some torch-side snapshot is older than the JAX state."""
        return bool(self.stale_idx.any())

    @stale.setter
    def stale(self, value: bool) -> None:
        self.stale_idx[:] = bool(value)

    def release(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self._export_cache = None

    def forget_jax_state(self, opt: "JaxOptimizer") -> None:
        """The torch-side state (``opt.state``) is authoritative: the JAX state is rebuilt from it at the next step."""
        self.state, self.spec, self._export_cache = None, None, None
        self.stale, self.handed = False, {}
        self.stepped = np.array([bool(dict.get(opt.state, p)) for p in self.params], dtype=bool)

    # ---- grads ------------------------------------------------------------------------------
    def check_sparse(self, opt: "JaxOptimizer") -> None:
        """Raise for a parameter with a sparse ``.grad`` or one that received a sparse gradient (then
        densified by accumulation into a dense ``.grad``) since the last ``zero_grad()``."""
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None and (g.layout != torch.strided or self.sparse_seen[i]):
                raise sparse_gradient_error(type(opt).__name__ if opt is not None else "torch_bridge",
                                            self.labels[i], g.layout if g.layout != torch.strided else None)

    # ---- state conversion -------------------------------------------------------------------
    def _params_def(self):
        return jax.tree.structure([0] * (1 if self.flat else len(self.params)))

    def _per_param_value(self, leaf, i: int, per_element: bool):
        raise NotImplementedError

    def _classify(self, leaf) -> str:
        raise NotImplementedError

    def _value_to_torch(self, opt, key, sub, i, host_cache):
        raise NotImplementedError

    def _edited(self, opt: "JaxOptimizer", i: int) -> bool:
        """Whether ``opt.state[p_i]`` differs from what the last export handed out: the entry replaced or
        removed, a key assigned, added or deleted, or a tensor changed in place (its ``_version`` moved)."""
        entry, recorded = self.handed[i]
        cur = dict.get(opt.state, self.params[i])
        if cur is not entry or len(cur) != len(recorded):
            return True
        for key, (value, version) in recorded.items():
            now = cur.get(key, _MISSING)
            if now is not value or (version is not None and now._version != version):
                return True
        return False

    def absorb_torch_edits(self, opt: "JaxOptimizer", group: dict, indices=None) -> bool:
        """Make edits of ``opt.state`` (see :meth:`_edited`) take effect: the other snapshots are brought up
        to date, the edits kept, and the JAX state is rebuilt from the torch-side state at the next step
        (the path ``load_state_dict`` takes). Returns whether there were edits."""
        if self.state is None or not self.handed:
            return False
        candidates = self.handed if indices is None else [i for i in indices if i in self.handed]
        edited = [i for i in candidates if self._edited(opt, i)]
        if not edited:
            return False
        if any(self.stale_idx[i] for i in edited):
            _warn_user(f"{type(opt).__name__}: the state of {self.labels[edited[0]]} was edited on a snapshot "
                       "read before the last step(); the edited values are used as they are (read "
                       "optimizer.state[p] after step() to edit the current state)")
        kept = {}
        for i in edited:
            entry, recorded = self.handed[i]
            cur = dict.get(opt.state, self.params[i])
            if not cur:
                kept[i] = None  # entry removed or emptied: the parameter starts afresh, as in torch
                continue
            changes = {k: v for k, v in cur.items()
                       if k not in recorded or recorded[k][0] is not v
                       or (recorded[k][1] is not None and v._version != recorded[k][1])}
            kept[i] = (changes, [k for k in recorded if k not in cur])
        self._export(opt, group, None)  # every other snapshot up to date (the edited keys are put back below)
        for i, k in kept.items():
            p = self.params[i]
            if k is None:
                dict.pop(opt.state, p, None)
                continue
            changes, removed = k
            entry = dict.get(opt.state, p)
            if entry is None:
                entry = {}
                dict.__setitem__(opt.state, p, entry)
            entry.update(changes)
            for key in removed:
                entry.pop(key, None)
        self.forget_jax_state(opt)
        return True

    def export(self, opt: "JaxOptimizer", group: dict, only: Optional[int] = None) -> None:
        """Write torch-format snapshots of the JAX state into ``opt.state`` (and global leaves into group):
        every stale parameter, or parameter ``only``. Edits of a stale snapshot are absorbed first."""
        if self.state is None:
            self.stale = False
            return
        idx = range(len(self.params)) if only is None else (only,)
        if self.handed and any(self.stale_idx[i] and i in self.handed and self._edited(opt, i) for i in idx):
            self.absorb_torch_edits(opt, group)
            return
        self._export(opt, group, only)

    def _export(self, opt, group, only):
        if self.state is None:
            self.stale = False
            return
        cache = self._export_cache
        if cache is None or cache[0] is not self.state:
            walked = _walk_state(self.state, self._params_def())
            names = opt._field_names(walked)
            per_param = [(names[path], sub) for path, sub, pp in walked if pp and names[path] is not None]
            cache = self._export_cache = (self.state, per_param, {})
            opt._export_global(group, [(path, leaf) for path, leaf, pp in walked if not pp])
        _, per_param, host_cache = cache
        for i in (range(len(self.params)) if only is None else (only,)):
            if not self.stale_idx[i]:
                continue
            self.stale_idx[i] = False
            p = self.params[i]
            entry = {key: self._value_to_torch(opt, key, sub, i, host_cache) for key, sub in per_param} \
                if self.stepped[i] else {}
            if not entry:
                dict.pop(opt.state, p, None)
                self.handed.pop(i, None)
                continue
            cur = dict.get(opt.state, p)
            if isinstance(cur, dict):  # the entry dict stays the same object (references to it stay current)
                cur.clear()
                cur.update(entry)
                entry = cur
            else:
                dict.__setitem__(opt.state, p, entry)
            self.handed[i] = (entry, {k: (v, v._version if torch.is_tensor(v) else None) for k, v in entry.items()})

    def _element_to_torch(self, leaf, i, host_cache):
        raise NotImplementedError

    def build_state(self, opt: "JaxOptimizer", group: dict, hyper, spec: StepSpec, device):
        """The JAX state for ``spec`` made from the torch-side state (``opt.state``) and a fresh init."""
        params_j = self.jax_params()
        template = _compiled_init(params_j, hyper, spec=spec)
        walked = _walk_state(template, self._params_def())
        names = opt._field_names(walked)
        presence = {path for path, _, pp in walked if pp and opt._is_presence(path)}
        torch_states = [opt.state.get_raw(p) for p in self.params]
        replacements = {}
        for path, sub, per_param in walked:
            if not per_param:
                continue
            key = names[path]
            replacements[path] = self._fill_field(sub, key, path in presence, torch_states)
        state = _rebuild_state(template, self._params_def(), replacements)
        globals_ = opt._import_global(group, [(path, leaf) for path, leaf, pp in walked if not pp])
        if globals_:
            state = _rebuild_state(state, self._params_def(), globals_)
        return jax.device_put(state, device)

    def _fill_field(self, sub, key, presence, torch_states):
        raise NotImplementedError


class _FlatBuffer(_Buffer):
    """Params of one dtype/device packed into one flat torch buffer; p.data / p.grad are its views."""

    flat = True

    def __init__(self, params, elementwise: bool, write_back: str = "copy", labels=None):
        super().__init__(params, labels)
        self.write_back = write_back
        dtype, device = params[0].dtype, params[0].device
        self.elementwise = elementwise
        self.layout = FlatLayout.from_shapes([tuple(p.shape) for p in params], dlpack.align_elements(dtype))
        total = self.layout.total
        self.flat_p = torch.zeros(total, dtype=dtype, device=device)
        self.flat_g = torch.zeros(total, dtype=dtype, device=device)
        self.filled = np.zeros(len(params), dtype=bool)  # segment of flat_g may hold non-zero values
        self.aliased: list = [None] * len(params)  # weakref to the .grad tensor moved onto segment i (_alias)
        self.pviews, self.gviews, self.ptrs = [], [], []
        self.mode = "uniform" if elementwise else "segment"
        with torch.no_grad():
            for i, p in enumerate(params):
                off, n = self.layout.offsets[i], self.layout.numels[i]
                pv = self.flat_p[off:off + n].view(p.shape)
                gv = self.flat_g[off:off + n].view(p.shape)
                pv.copy_(p.detach())
                p.data = pv
                self.pviews.append(pv)
                self.gviews.append(gv)
                self.ptrs.append(pv.data_ptr())
        self.jp = [dlpack.to_jax(self.flat_p, zero_copy=True)]
        self.jg = [dlpack.to_jax(self.flat_g, zero_copy=True)]
        self.device = next(iter(self.jp[0].devices()))
        self.scratch = None
        if write_back == "swap":
            # the params live in a JAX-owned buffer viewed by torch; each step writes a second one
            owned = jax.device_put(jnp.array(self.jp[0], copy=True), self.device)
            self.jp = [owned]
            self._repoint(dlpack.to_torch(owned))

    def _repoint(self, flat_p: torch.Tensor) -> None:
        """Point every ``p.data`` at views of ``flat_p`` (swap write-back)."""
        self.flat_p = flat_p
        with torch.no_grad():
            for i, p in enumerate(self.params):
                off, n = self.layout.offsets[i], self.layout.numels[i]
                pv = flat_p[off:off + n].view(p.shape)
                p.data = pv
                self.pviews[i] = pv
                self.ptrs[i] = pv.data_ptr()

    def jax_params(self):
        return self.jp

    def nbytes(self) -> int:
        """Bytes held by the bridge for this buffer: flat params, grads, scratch and JAX state."""
        leaves = jax.tree.leaves(self.state) + (jax.tree.leaves(self.scratch) if self.scratch else [])
        return (self.flat_p.nbytes + self.flat_g.nbytes + sum(int(x.nbytes) for x in leaves))

    def _classify(self, leaf, i=None):
        if leaf.ndim == 0:
            return "scalar"
        if leaf.shape[0] == self.layout.num_segments and leaf.shape[0] != self.layout.total:
            return "segment"
        return "element"

    def _element_to_torch(self, leaf, i, host_cache):
        if id(leaf) not in host_cache:
            host_cache[id(leaf)] = dlpack.to_torch(leaf)
        off, n = self.layout.offsets[i], self.layout.numels[i]
        return host_cache[id(leaf)][off:off + n].view(self.params[i].shape).clone()

    def _fill_field(self, sub, key, presence, torch_states):
        leaf = sub[0]
        kind = self._classify(leaf)
        n = len(self.params)
        if kind == "element":
            out = dlpack.to_torch(leaf).clone()
            for i, st in enumerate(torch_states):
                if st and key in st:
                    value = _as_tensor(st[key], i, self.params[i])
                    off, num = self.layout.offsets[i], self.layout.numels[i]
                    out[off:off + num].copy_(value.reshape(-1))
            return [dlpack.to_jax_copy(out)]
        host = np.array(leaf)  # 0-d (uniform) or per-segment vector
        values = []
        for i, st in enumerate(torch_states):
            if presence:
                values.append(1 if st else 0)
            elif st and key in st:
                values.append(_scalar_of(st[key]))
            else:
                values.append(host if kind == "scalar" else host[i])
        if kind == "scalar":
            if any(not np.array_equal(np.asarray(v), np.asarray(values[0])) for v in values):
                raise _NeedsSegmentMode()
            return [jnp.asarray(np.asarray(values[0]).astype(host.dtype))]
        vec = host.copy()
        vec[:n] = np.asarray(values).astype(host.dtype).reshape(n, *host.shape[1:])
        return [jnp.asarray(vec)]

    def _value_to_torch(self, opt, key, sub, i, host_cache):
        leaf = sub[0]
        kind = self._classify(leaf, i)
        if kind == "element":
            return self._element_to_torch(leaf, i, host_cache)
        if id(leaf) not in host_cache:
            host_cache[id(leaf)] = np.asarray(leaf)
        host = host_cache[id(leaf)]
        return opt._state_value_to_torch(key, host if kind == "scalar" else host[i], self.params[i])

    def sync_grads(self, opt=None):
        """Before a step: ``marks[i] = p.grad is not None``; put every such gradient into the flat grad
        buffer; detect moved params.

        A ``.grad`` that already is (or aliases) its segment costs nothing. The others (fresh tensors from a
        backward after ``zero_grad(set_to_none=True)``, assigned ``p.grad = g``...) are copied in with one
        ``torch._foreach_copy_`` and then moved onto their segment (:meth:`_alias`), so that later
        accumulation (micro-batches, ``zero_grad(set_to_none=False)``) lands in the buffer directly. A None
        grad keeps its segment at zero (ELRA reads the whole buffer).
        """
        if self.sparse_seen.any():
            self.check_sparse(opt)
        dsts, srcs, where, rebuild = [], [], [], False
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.data_ptr() != self.ptrs[i]:
                    if p.shape != self.pviews[i].shape or p.dtype != self.flat_p.dtype or p.device != self.flat_p.device:
                        rebuild = True
                        continue
                    self.pviews[i].copy_(p.detach())
                    p.data = self.pviews[i]
                g = p.grad
                if self.aliased[i] is not None:
                    self._release_alias(i, g)
                if g is None:
                    self.marks[i] = False
                    if self.filled[i]:
                        self.gviews[i].zero_()
                        self.filled[i] = False
                else:
                    self.marks[i] = True
                    gv = self.gviews[i]
                    if g is not gv:
                        if g.layout != torch.strided:
                            self.check_sparse(opt)
                        if (g.data_ptr() != gv.data_ptr() or g.dtype != gv.dtype or g.shape != gv.shape
                                or g.stride() != gv.stride()):
                            dsts.append(gv)
                            srcs.append(g)
                            where.append(i)
                    self.filled[i] = True
            if dsts:
                torch._foreach_copy_(dsts, srcs)
                self._alias(srcs, list(zip(dsts, where)))
        if rebuild:
            raise _NeedsRebuild()

    def _release_alias(self, i: int, grad) -> None:
        """A tensor moved onto segment ``i`` that is no longer ``p.grad`` (``zero_grad()``, ``p.grad = ...``)
        but is still referenced gets its own memory back before the segment is rewritten: the bridge never
        changes a tensor that torch would no longer touch. (A view of it taken by user code is not tracked.)"""
        ref = self.aliased[i]
        a = ref()
        if a is None:
            self.aliased[i] = None
        elif a is not grad:
            self.aliased[i] = None
            if a.data_ptr() == self.gviews[i].data_ptr():
                a.set_(a.clone())

    def _alias(self, grads, views) -> None:
        """Move each copied ``.grad`` tensor onto its segment (``set_``: same object, so ``p.grad is g`` holds
        and user references to it stay torch's aliases), so that the next accumulation into it is zero-copy.
        Views, tensors in the graph (create_graph) and tensors already in the flat buffer are left as they
        are (they are copied at each step)."""
        storage = self.flat_g.untyped_storage().data_ptr()
        seen = set()
        for g, (gv, i) in zip(grads, views):
            if (g._base is not None or g.requires_grad or id(g) in seen
                    or g.untyped_storage().data_ptr() == storage):
                continue
            seen.add(id(g))
            try:
                g.set_(gv)
            except RuntimeError:  # e.g. a tensor made by .detach() / .data: set_ is not allowed on it
                continue
            self.aliased[i] = weakref.ref(g)

    def zero_grad(self, set_to_none: bool):
        """torch's ``zero_grad``: None grads (set_to_none) or zeroed ones; the segments that alias a ``.grad``
        are zeroed with one fill of the flat buffer, other ``.grad`` tensors in place as torch does."""
        with torch.no_grad():
            if set_to_none:
                for p in self.params:
                    if p.grad is not None:
                        p.grad = None
            else:
                for i, p in enumerate(self.params):
                    g = p.grad
                    if self.aliased[i] is not None:
                        self._release_alias(i, g)
                    if g is not None and g is not self.gviews[i] and g.data_ptr() != self.gviews[i].data_ptr():
                        if g.grad_fn is not None:
                            g.detach_()
                        else:
                            g.requires_grad_(False)
                        g.zero_()
                self.flat_g.zero_()
                self.filled[:] = False
        self.sparse_seen[:] = False

    def step(self, opt, group, entry_name, static, hyper, value, flag=None):
        if not self.marks.any():
            return
        if self.mode == "uniform" and not self.marks.all():
            self.mode = "segment"
        spec = StepSpec(entry_name, static, self.layout if self.mode == "segment" else None)
        if spec != self.spec:
            if self.state is not None:
                self.export(opt, group)
            self.state, self.spec = None, spec
        if self.state is None:
            try:
                self.state = self.build_state(opt, group, hyper, spec, self.device)
            except _NeedsSegmentMode:
                self.mode = "segment"
                self.spec = spec = StepSpec(entry_name, static, self.layout)
                self.state = self.build_state(opt, group, hyper, spec, self.device)
        if self.scratch is None:
            self.scratch = [jax.device_put(jnp.zeros_like(self.jp[0]), self.device)]
        self._export_cache = None  # torch views of the state would make its donation fall back to a copy
        mask = None if self.mode == "uniform" else [np.append(self.marks, True)]
        new_p, self.state = _compiled_step(self.scratch, self.state, self.jp, self.jg, hyper, mask, value, flag,
                                           spec=spec)
        view = dlpack.to_torch(new_p[0])  # waits for the step; XLA is then done reading torch memory
        if self.write_back == "swap":
            old = self.jp
            self._repoint(view)  # drops every torch view of the old buffer, which becomes the scratch
            self.jp, self.scratch = new_p, old
        else:
            self.flat_p.copy_(view)
            del view  # a live torch view would make the next donation silently fall back to a copy
            self.scratch = new_p
        self.stepped |= self.marks
        self.stale_idx |= self.marks


class _SimpleBuffer(_Buffer):
    """Per-parameter pytree imported at every step; written back with ``copy_``."""

    flat = False

    def __init__(self, params, labels=None, watch: bool = True):
        super().__init__(params, labels, watch)
        self.device = None
        self._zeros = {}
        if len(params) >= SIMPLE_PATH_WARN_LEAVES:
            warnings.warn(
                f"torch_bridge: {len(params)} parameters on the simple (per-tensor) path; compile time grows "
                "linearly with the number of tensors. Use contiguous, non-aliased parameters for the flat path.",
                stacklevel=4,
            )

    def jax_params(self):
        return [dlpack.to_jax(p) for p in self.params]

    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(self.state))

    def _value_to_torch(self, opt, key, sub, i, host_cache):
        leaf, p = sub[i], self.params[i]
        scalar = leaf.ndim == 0 and (p.dim() != 0 or opt._is_scalar_key(key)
                                     or not jnp.issubdtype(leaf.dtype, jnp.floating))
        if scalar:
            return opt._state_value_to_torch(key, np.asarray(leaf), p)
        return dlpack.to_torch(leaf).clone()

    def _fill_field(self, sub, key, presence, torch_states):
        out = []
        for i, (leaf, st) in enumerate(zip(sub, torch_states)):
            p = self.params[i]
            if tuple(leaf.shape) == tuple(p.shape) and not (leaf.ndim == 0 and presence):
                if st and key in st:
                    value = _as_tensor(st[key], i, p)
                    out.append(dlpack.to_jax_copy(value.contiguous(), leaf.dtype))
                else:
                    out.append(leaf)
            else:
                if presence:
                    out.append(jnp.asarray(1 if st else 0, leaf.dtype))
                elif st and key in st:
                    out.append(jnp.asarray(_scalar_of(st[key]), leaf.dtype))
                else:
                    out.append(leaf)
        return out

    def sync_grads(self, opt=None):
        if self.sparse_seen.any():
            self.check_sparse(opt)
        for i, p in enumerate(self.params):
            g = p.grad
            self.marks[i] = g is not None
            if g is not None and g.layout != torch.strided:
                self.check_sparse(opt)

    def zero_grad(self, set_to_none: bool):
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()
        self.sparse_seen[:] = False

    def step(self, opt, group, entry_name, static, hyper, value, flag=None):
        mask_host = list(self.marks)
        if not any(mask_host):
            return
        if self.device is None:
            self.device = dlpack.to_jax(self.params[0]).devices().pop()
        spec = StepSpec(entry_name, static, None)
        if spec != self.spec:
            if self.state is not None:
                self.export(opt, group)
            self.state, self.spec = None, spec
        if self.state is None:
            self.state = self.build_state(opt, group, hyper, spec, self.device)
        params_j = self.jax_params()
        grads_j = []
        for p, has in zip(self.params, mask_host):
            if has:
                grads_j.append(dlpack.to_jax(p.grad))
            else:
                key = (tuple(p.shape), p.dtype)
                if key not in self._zeros:
                    self._zeros[key] = jax.device_put(jnp.zeros(p.shape, dlpack.to_jax(p).dtype), self.device)
                grads_j.append(self._zeros[key])
        mask = [np.bool_(m) for m in mask_host]
        self._export_cache = None
        new_p, self.state = _compiled_step(None, self.state, params_j, grads_j, hyper, mask, value, flag, spec=spec)
        with torch.no_grad():
            for p, new, has in zip(self.params, new_p, mask_host):
                if has:
                    p.copy_(dlpack.to_torch(new))
        self.stepped |= self.marks
        self.stale_idx |= self.marks


class _NeedsSegmentMode(Exception):
    pass


class _NeedsRebuild(Exception):
    pass


_MISSING = object()


def sparse_gradient_error(owner: str, label: str, layout=None) -> RuntimeError:
    """The error for a sparse gradient (``layout``: the ``.grad``'s sparse layout; None: a sparse gradient was
    accumulated into a dense ``.grad`` since the last ``zero_grad()``). Sparse gradients are never densified."""
    how = (f"a sparse gradient (layout {layout})" if layout is not None else
           "a sparse gradient since the last zero_grad() (accumulated into its dense .grad)")
    return RuntimeError(
        f"{owner}: {label} has {how}; torch_bridge optimizers take dense gradients only and never densify a "
        "sparse one (use a dense gradient, e.g. nn.Embedding(..., sparse=False), or torch.optim.SparseAdam for "
        "this parameter)")


def _note_sparse(buffer_ref, index, grad):
    if grad.layout != torch.strided:
        buf = buffer_ref()
        if buf is not None and index < len(buf.sparse_seen):
            buf.sparse_seen[index] = True


def _watch_sparse(buf, params) -> list:
    """A tensor hook per trainable parameter that notes sparse gradients (they would be densified silently
    when accumulated into a dense ``.grad``); it only reads the layout and never changes the gradient. Which
    parameters are stepped is decided from ``p.grad is not None`` alone."""
    ref = weakref.ref(buf)
    return [p.register_hook(functools.partial(_note_sparse, ref, i)) for i, p in enumerate(params)
            if p.requires_grad]


def _as_tensor(value, index: int, param: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(value):
        value = torch.as_tensor(value)
    if value.numel() != param.numel() or (value.dim() and tuple(value.shape) != tuple(param.shape)):
        raise ValueError(
            f"state of parameter {index} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
        )
    return value.detach().to(device=param.device)


_TORCH_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _scalar_of(value):
    if torch.is_tensor(value):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16 or value.dtype == torch.float16:
            value = value.float()
        if value.dtype in _TORCH_UNSIGNED:  # torch's barebones unsigned dtypes (older state dicts)
            value = value.to(torch.int64)
        return value.numpy()
    return np.asarray(value)


def _host_to_torch(host) -> torch.Tensor:
    """A global (non-parameter) JAX state leaf, on the host, as a torch tensor of the same values. Unsigned
    integers (PRNG keys: ``uint32`` words) become ``int64``, which holds every ``uint32`` value exactly:
    torch's ``uint32`` tensors pickle but cannot be unpickled, so ``pickle`` / ``copy.deepcopy`` of the
    optimizer or its state dict would fail at restore. :func:`_host_of_torch` casts back."""
    host = np.array(host)
    if host.dtype.kind == "u":
        if host.dtype.itemsize > 4:
            raise TypeError(f"a {host.dtype} state leaf does not fit int64 exactly")
        host = host.astype(np.int64)
    return torch.from_numpy(host)


def _host_of_torch(value, dtype) -> np.ndarray:
    """A torch-side global state value as a host array of the JAX leaf's ``dtype``: exact for what
    :func:`_host_to_torch` wrote (and for ``uint32`` tensors of older state dicts); integers outside the
    range of an integer ``dtype`` raise ``ValueError`` instead of wrapping around."""
    host, dtype = np.asarray(_scalar_of(value)), np.dtype(dtype)
    if dtype.kind in "iu" and host.dtype.kind in "iu" and host.size:
        info = np.iinfo(dtype)
        if host.min() < info.min or host.max() > info.max:
            raise ValueError(f"a state value holds integers outside the range of {dtype}")
    return host.astype(dtype)


# --------------------------------------------------------------------------------------------------
# the lazily refreshed torch-side state
# --------------------------------------------------------------------------------------------------


class _LazyState(collections.defaultdict):
    """``optimizer.state``: a defaultdict whose values are refreshed from the JAX state on read (``state[p]``
    refreshes ``p``'s entry only, iteration all of them)."""

    def __init__(self, owner, data=()):
        super().__init__(dict, data)
        self._owner = weakref.ref(owner)

    def _refresh(self, key=_MISSING):
        owner = self._owner()
        if owner is not None:
            if key is _MISSING or not hasattr(owner, "_refresh_entry"):
                owner._refresh_state()
            else:
                owner._refresh_entry(key)

    def get_raw(self, key, default=None):
        return dict.get(self, key, default)

    def __getitem__(self, key):
        self._refresh(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._refresh(key)
        return super().get(key, default)

    # writes refresh the entry first, so that the bridge knows what it replaces (see JaxOptimizer.step)
    def __setitem__(self, key, value):
        self._refresh(key)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._refresh(key)
        super().__delitem__(key)

    def pop(self, key, *default):
        self._refresh(key)
        return super().pop(key, *default)

    def setdefault(self, key, default=None):
        self._refresh(key)
        return super().setdefault(key, default)

    def popitem(self):
        self._refresh()
        return super().popitem()

    def clear(self):
        self._refresh()
        super().clear()

    def update(self, *args, **kwargs):
        self._refresh()
        super().update(*args, **kwargs)

    def items(self):
        self._refresh()
        return super().items()

    def keys(self):
        self._refresh()
        return super().keys()

    def values(self):
        self._refresh()
        return super().values()

    def __iter__(self):
        self._refresh()
        return super().__iter__()

    def __len__(self):
        self._refresh()
        return super().__len__()

    def __contains__(self, key):
        self._refresh(key)
        return super().__contains__(key)

    def __repr__(self):
        self._refresh()
        return dict.__repr__(self)

    def __reduce__(self):
        self._refresh()
        return (collections.defaultdict, (dict,), None, None, iter(list(dict.items(self))))

    def __deepcopy__(self, memo):
        import copy

        self._refresh()
        out = collections.defaultdict(dict)
        for k, v in dict.items(self):
            out[copy.deepcopy(k, memo)] = copy.deepcopy(v, memo)
        return out


# --------------------------------------------------------------------------------------------------
# the optimizer
# --------------------------------------------------------------------------------------------------


class _GroupRuntime:
    def __init__(self, group, buffers):
        self.params_list = group["params"]  # the group's list object (identity check per step)
        self.param_ids = [id(p) for p in group["params"]]
        self.buffers = buffers
        self.where = {id(p): (buf, i) for buf in buffers for i, p in enumerate(buf.params)}

    def matches(self, group) -> bool:
        params = group["params"]
        if params is self.params_list and len(params) == len(self.param_ids):
            return True
        return self.param_ids == [id(p) for p in params]


def _eager(fn):
    """Run ``fn`` outside ``torch.compile``: dynamo calls it eagerly (a graph break) instead of tracing the JAX
    step, as torch does for its own ``zero_grad`` / ``state_dict``."""
    if getattr(fn, "_torch_bridge_eager", False):
        return fn
    out = torch.compiler.disable(fn)
    out._torch_bridge_eager = True
    return out


_EAGER_METHODS = ("step", "zero_grad", "state_dict", "load_state_dict")


class JaxOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running a :mod:`jaxopt_suite` registry entry in JAX.

    Generic use: ``JaxOptimizer(model.parameters(), "adam", lr=1e-3, b1=0.9)`` (group keys are the
    factory's argument names, with ``lr`` for ``learning_rate``). Torch-named subclasses (``Adam``...)
    take torch's signatures. See the module docstring for the execution model and how to subclass.

    Args:
      params: iterable of tensors, dicts (param groups) or ``(name, tensor)`` pairs.
      optimizer: registry entry name (subclasses set ``entry_name`` instead).
      defaults: group defaults (subclasses); generic use passes keyword hyperparameters instead.
      flat: use the flat zero-copy path where possible (``False`` forces the simple path).
      write_back: ``"copy"`` (default): new params land in a donated JAX scratch and are copied into the
        torch-owned flat buffer (stable ``data_ptr``). ``"swap"``: params live in JAX-owned buffers viewed by
        torch and each step re-points ``p.data`` to the other buffer (no copy; ``data_ptr`` alternates, so
        views cached outside the optimizer, e.g. ``w.t()``, go stale and keep the old buffer from being reused).
      nonfinite: what a step does when a gradient element (or, for optimizers that take one, the loss) is
        NaN or ±inf; a group option (``param_groups[i]["nonfinite"]``, saved in the state dict).
        ``"propagate"`` (default): no check, the optimizer's own behaviour (torch.optim's: the NaN reaches
        the parameters and state). ``"skip"``: the step leaves the parameters and the state of every
        ``"skip"`` group bit-identical and adds 1 to the group key ``"nonfinite_skips"``; decided on the
        device (no host sync), over all such groups together (:func:`jaxopt_suite.skip_nonfinite`).
        ``"raise"``: ``step()`` checks the gradients first (one host sync) and raises ``FloatingPointError``
        naming the param group and the parameter (index and shape), or the loss, before anything is modified.
    """

    entry_name: ClassVar[Optional[str]] = None
    state_keys: ClassVar[Mapping[str, str]] = {}
    presence_fields: ClassVar[tuple[str, ...]] = ()
    group_state_keys: ClassVar[Mapping[str, str]] = {}
    elementwise: ClassVar[bool] = False
    group_flag_defaults: ClassVar[Mapping[str, Any]] = {}
    scalar_state_keys: ClassVar[tuple[str, ...]] = ("step",)
    # per-parameter keys whose absence torch.optim reads as "not started yet" (key -> what happens then):
    # load_state_dict accepts their absence (or None) as torch does, with a UserWarning that says so
    _optional_state_keys: ClassVar[Mapping[str, str]] = {}

    def __init__(self, params, optimizer: Optional[str] = None, defaults: Optional[Mapping[str, Any]] = None,
                 *, flat: bool = True, write_back: str = "copy", nonfinite: str = "propagate", **hyperparams):
        name = optimizer or inspect.getattr_static(type(self), "entry_name")
        if isinstance(name, staticmethod):  # a factory function stored as a class attribute
            name = name.__func__
        if name is None:
            raise ValueError("JaxOptimizer needs a registry entry name, e.g. JaxOptimizer(params, 'adam')")
        self._entry_name = name
        self._generic = defaults is None
        if defaults is None:
            defaults = _generic_defaults(registry.get(name), hyperparams)
        elif hyperparams:
            raise TypeError(f"unexpected arguments {sorted(hyperparams)}")
        V.check_flag("flat", flat)
        self.flat = bool(flat)
        if not isinstance(write_back, str) or write_back not in ("copy", "swap"):
            raise ValueError(f"Invalid write_back: {write_back!r}; expected 'copy' or 'swap'")
        self.write_back = write_back
        self._init_runtime()
        super().__init__(params, {**dict(defaults), "nonfinite": check_nonfinite(nonfinite)})
        self.state = _LazyState(self, dict.items(self.state))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in _EAGER_METHODS:  # subclasses' overrides (ELRA.step...) run outside torch.compile too
            fn = cls.__dict__.get(name)
            if callable(fn) and not getattr(fn, "hooked", False):
                setattr(cls, name, _eager(fn))

    # ---- subclass hooks -----------------------------------------------------------------------
    def _entry_for_group(self, group: Mapping[str, Any]):
        """The registry name (or hashable factory callable, see :class:`StepSpec`) used for ``group``."""
        return self._entry_name

    def _hyperparams(self, group: Mapping[str, Any]) -> dict[str, float]:
        """Traced numeric kwargs of the factory, read from the group at every step."""
        entry = registry.get(self._entry_for_group(group))
        out = {}
        for name in entry.hyperparams:
            key = "lr" if name == "learning_rate" else name
            if key in group and group[key] is not None and not isinstance(group[key], bool):
                out[name] = float(group[key])
        # integers the factory reads in init only (EnhancedSGD's seed): traced as integers, so that instances
        # differing in them share the compiled step (a static value would compile one per instance)
        for name in getattr(entry.factory, INIT_ONLY_ATTR, ()):
            value = group.get("lr" if name == "learning_rate" else name)
            if name not in out and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                out[name] = np.int64(value)
        return out

    def _static_config(self, group: Mapping[str, Any]) -> dict[str, Hashable]:
        """Static (structural) kwargs of the factory; a change rebuilds the compiled step."""
        entry = registry.get(self._entry_for_group(group))
        hyper = set(self._hyperparams(group))
        params = inspect.signature(entry.factory).parameters
        out = {}
        for name in params:
            key = "lr" if name == "learning_rate" else name
            if name in hyper or name == "segments" or key not in group:
                continue
            out[name] = group[key]
        return out

    # ---- validation (every param group, at construction and in add_param_group) ------------------
    def _group_kinds(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """``(kinds, optional_numbers)`` for :func:`torch_bridge._validate.check_group`.

        ``kinds``: per group key, a default of the kind the key must hold (not the user's value): for a
        named class its ``__init__`` defaults overlaid with ``group_flag_defaults``; for the generic class
        the registry factory's signature (``lr`` for ``learning_rate``; flags are checked by the factory), where a numeric hyperparameter
        defaulting to ``None`` (SGD's ``momentum``: no buffer) accepts ``None``.
        """
        if self._generic:
            entry = registry.get(self._entry_name)
            # flags are left to the factory (static_bool, or a choice such as EnhancedSGD's gradient_centering)
            kinds = {("lr" if n == "learning_rate" else n): p.default
                     for n, p in factory_signature(entry.factory).parameters.items()
                     if p.default is not p.empty and not isinstance(p.default, bool)}
            optional = tuple(("lr" if n == "learning_rate" else n) for n in entry.hyperparams
                             if kinds.get("lr" if n == "learning_rate" else n, 0) is None)
            return kinds, optional
        kinds = {n: p.default for n, p in inspect.signature(type(self).__init__).parameters.items()
                 if p.default is not p.empty}
        kinds.update(self.group_flag_defaults)
        return kinds, ()

    def _validation_static(self, group: Mapping[str, Any]) -> dict[str, Hashable]:
        """The static config :meth:`_check_group` builds with (a subclass whose ``_static_config`` latches
        state at the first step overrides this)."""
        return self._static_config(group)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """Validate one param group: the bridge's type, flag and finiteness checks (stricter than torch,
        after torch's own checks in the named constructors; :func:`torch_bridge._validate.check_group`),
        then the group's registry factory builds its transformation once, so the JAX factory's range checks
        (``ValueError`` naming the argument) run now rather than at the first step. The generic class passes
        the group's values as given (tensors as Python numbers) to the entry's factory."""
        kinds, optional = self._group_kinds()
        V.check_group(group, kinds, optional)
        entry = self._entry_for_group(group)
        if self._generic:
            reg = registry.get(entry)
            kwargs = {}
            for name in factory_signature(reg.factory).parameters:
                key = "lr" if name == "learning_rate" else name
                if name != "segments" and key in group:
                    kwargs[name] = V.scalar(group[key])
            reg.build(**kwargs)
        else:
            StepSpec(entry, tuple(sorted(self._validation_static(group).items()))).transformation(
                self._hyperparams(group))

    def _state_value_to_torch(self, key: str, value: np.ndarray, param: torch.Tensor):
        """A per-parameter scalar state value in torch's format (``step`` is a 0-d float32 tensor)."""
        value = np.asarray(value)
        if key == "step":
            return torch.tensor(float(value), dtype=torch.float32)
        if value.dtype == np.bool_:
            return bool(value)
        if np.issubdtype(value.dtype, np.integer):
            return int(value)
        return torch.tensor(value.item(), dtype=torch.float64 if value.dtype == np.float64 else torch.float32)

    # ---- the non-finite policy ----------------------------------------------------------------
    def _group_state_keys(self) -> dict:
        """``group_state_keys`` and the keys every class has (``"nonfinite_skips"``)."""
        return {**self.group_state_keys, **_BASE_GROUP_STATE_KEYS}

    @staticmethod
    def _policy(group: Mapping[str, Any]) -> str:
        return check_nonfinite(group.get("nonfinite", "propagate"))

    def _static_items(self, group: Mapping[str, Any], *, policy: bool = True) -> tuple:
        """The compiled step's static kwargs: :meth:`_static_config` plus ``nonfinite="skip"`` (only then:
        "propagate" and "raise" build exactly the transformation of today; "raise" is checked in torch)."""
        cfg = dict(self._static_config(group))
        cfg.pop("nonfinite", None)  # the generic class reads every factory argument from the group
        if policy and self._policy(group) == "skip":
            cfg["nonfinite"] = "skip"
        return tuple(sorted(cfg.items()))

    def _nonfinite_precheck(self, value) -> dict:
        """Run before any group is stepped. "raise" groups: ``FloatingPointError`` on a non-finite gradient
        (or loss) -- one host sync, the culprit located only on failure. "skip" groups spread over several
        compiled steps (groups, dtypes, devices): one finiteness flag over all of them, as a device scalar
        per device (no host sync), so that they are skipped together. Returns ``{index of group: {device:
        flag}}`` for those groups (empty when a single compiled step decides by itself)."""
        policies = [self._policy(g) for g in self.param_groups]
        if "raise" in policies:
            self._raise_if_nonfinite([i for i, p in enumerate(policies) if p == "raise"], value)
        skip = [i for i, p in enumerate(policies) if p == "skip"]
        if sum(len(self._runtime[i].buffers) for i in skip) <= 1:
            return {}
        partial = {}
        for i in skip:
            for t in _grad_tensors(self._runtime[i].buffers):
                partial.setdefault(t.device, []).append(_all_finite(t))
        if not partial:
            return {}
        partial = {d: torch.stack(v).all() for d, v in partial.items()}
        flags = {}
        for i in skip:
            for buf in self._runtime[i].buffers:
                dev = buf.params[0].device
                if dev not in flags:
                    ok = torch.stack([f.to(dev, non_blocking=True) for f in partial.values()]).all()
                    flags[dev] = dlpack.to_jax(ok.to(torch.float32).reshape(()))
        return {i: flags for i in skip}

    def _raise_if_nonfinite(self, groups, value) -> None:
        """``FloatingPointError`` naming the loss or the first parameter of ``groups`` with a non-finite
        gradient (:func:`raise_if_nonfinite`; the flat buffers are checked as one tensor each)."""
        takes_value = any(entry_info(self._entry_for_group(self.param_groups[gi]))[0] for gi in groups)
        raise_if_nonfinite(f"{type(self).__name__}.step", self.param_groups, groups,
                           tensors=[t for gi in groups for t in _grad_tensors(self._runtime[gi].buffers)],
                           value=value if takes_value else None)

    # ---- field naming -------------------------------------------------------------------------
    def _field_names(self, walked) -> dict:
        names = {}
        used = set()
        for path, _, per_param in walked:
            if not per_param:
                continue
            if self._is_presence(path):
                names[path] = None
                continue
            key = None
            for tkey, field in self.state_keys.items():
                if tkey not in used and _field_matches(path, field):
                    key = tkey
                    break
            if key is None:
                key = _path_name(path)
            used.add(key)
            names[path] = key
        return names

    def _is_presence(self, path) -> bool:
        return any(_field_matches(path, f) for f in self.presence_fields)

    def _is_scalar_key(self, key: str) -> bool:
        return key in self.scalar_state_keys

    def _export_global(self, group, leaves):
        extra = {}
        for path, leaf in leaves:
            key = next((k for k, f in self._group_state_keys().items() if _field_matches(path, f)), None)
            host = np.asarray(leaf)
            if key is not None:
                group[key] = host.item() if host.ndim == 0 else _host_to_torch(host)
            else:
                extra[_path_name(path)] = _host_to_torch(host)
        if extra:
            group["jax_state"] = extra

    def _import_global(self, group, leaves):
        replacements = {}
        extra = group.get("jax_state") or {}
        for path, leaf in leaves:
            key = next((k for k, f in self._group_state_keys().items() if _field_matches(path, f)), None)
            if key is not None and key in group:
                value = group[key]
            elif _path_name(path) in extra:
                value = extra[_path_name(path)]
            else:
                continue
            replacements[path] = jnp.asarray(_host_of_torch(value, leaf.dtype), dtype=leaf.dtype).reshape(leaf.shape)
        return replacements

    # ---- runtime (adoption of params into buffers) --------------------------------------------
    def _init_runtime(self):
        self._runtime: list[_GroupRuntime] = []
        self._runtime_valid = True

    def _adopt_group(self, group) -> _GroupRuntime:
        params = list(group["params"])
        for p in params:
            dlpack.check_dtype(p)
        _, supports_segments = entry_info(self._entry_for_group(group))
        flat_ok = [self.flat and supports_segments and _flat_candidate(p) for p in params]
        _exclude_overlaps(params, flat_ok)
        label = dict(zip(map(id, params), param_labels(self.param_groups, params)))

        def labels(ps):
            return [label[id(p)] for p in ps]

        buffers = []
        if self.elementwise:
            by_kind = collections.OrderedDict()
            for p, ok in zip(params, flat_ok):
                if ok:
                    by_kind.setdefault((p.dtype, p.device), []).append(p)
            for plist in by_kind.values():
                buffers.append(_FlatBuffer(plist, elementwise=True, write_back=self.write_back,
                                           labels=labels(plist)))
            rest = [p for p, ok in zip(params, flat_ok) if not ok]
            if rest:
                buffers.append(_SimpleBuffer(rest, labels(rest)))
        else:
            kinds = {(p.dtype, p.device) for p in params}
            if params and all(flat_ok) and len(kinds) == 1:
                buffers.append(_FlatBuffer(params, elementwise=False, write_back=self.write_back,
                                           labels=labels(params)))
            elif params:
                buffers.append(_SimpleBuffer(params, labels(params)))
        for buf in buffers:
            buf.stepped = np.array([bool(dict.get(self.state, p)) for p in buf.params], dtype=bool)
        return _GroupRuntime(group, buffers)

    def _ensure_runtime(self):
        if self._runtime_valid and len(self._runtime) == len(self.param_groups):
            ok = all(rt.matches(g) for rt, g in zip(self._runtime, self.param_groups))
            if ok:
                return
        old = self._runtime
        for rt in old:
            for buf in rt.buffers:
                buf.release()
        self._runtime = [self._adopt_group(g) for g in self.param_groups]
        self._runtime_valid = True

    def _rebuild_group(self, index: int):
        rt = self._runtime[index]
        group = self.param_groups[index]
        for buf in rt.buffers:
            if buf.stale:
                buf.export(self, group)
            buf.release()
        warnings.warn("torch_bridge: parameters changed storage, dtype or device after construction; "
                      "re-adopting them (state is cast to the new dtype).", stacklevel=3)
        for p, st in [(p, dict.get(self.state, p)) for p in group["params"]]:
            if st:
                dict.__setitem__(self.state, p, {
                    k: (v.to(dtype=p.dtype, device=p.device) if torch.is_tensor(v) and k != "step" and v.dim() else v)
                    for k, v in st.items()})
        self._runtime[index] = self._adopt_group(group)

    def _refresh_state(self):
        """Bring every torch-side snapshot up to date (``state_dict``, iteration over ``self.state``...)."""
        if not getattr(self, "_runtime", None):
            return
        for rt, group in zip(self._runtime, self.param_groups):
            for buf in rt.buffers:
                if buf.stale:
                    buf.export(self, group)

    def _refresh_entry(self, key) -> None:
        """Bring the snapshot of parameter ``key`` up to date (one copy of its state), or all if not a param."""
        for rt, group in zip(getattr(self, "_runtime", None) or (), self.param_groups):
            loc = rt.where.get(id(key))
            if loc is not None and loc[0].params[loc[1]] is key:
                buf, i = loc
                if buf.stale_idx[i]:
                    buf.export(self, group, only=i)
                return
        self._refresh_state()

    def _adopt_torch_state_object(self) -> None:
        """``self.state`` was replaced by user code (``opt.state = defaultdict(dict)`` resets, as in torch):
        wrap the new mapping and make it authoritative."""
        raw = self.state
        self.state = _LazyState(self, dict.items(raw) if isinstance(raw, Mapping) else raw)
        for rt in getattr(self, "_runtime", None) or ():
            for buf in rt.buffers:
                buf.forget_jax_state(self)

    def bridge_nbytes(self) -> int:
        """Bytes of the buffers the bridge owns (flat params and grads, scratch, JAX state)."""
        return sum(buf.nbytes() for rt in self._runtime for buf in rt.buffers)

    # ---- torch.optim API ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, then :meth:`_check_group` on the new group (removed again if it fails)."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except BaseException:
            self.param_groups.pop()
            raise
        if hasattr(self, "_runtime") and self._runtime_valid and len(self._runtime) == len(self.param_groups) - 1:
            self._runtime.append(self._adopt_group(self.param_groups[-1]))

    @_eager
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``: with ``set_to_none`` (the default) every ``p.grad`` becomes None, and those
        parameters are skipped by ``step()`` until they get a gradient again; otherwise the grads are zeroed
        (and stepped)."""
        self._ensure_runtime()
        for rt in self._runtime:
            for buf in rt.buffers:
                buf.zero_grad(set_to_none)

    @_eager
    def step(self, closure=None, *, value=None):
        """One optimizer step; returns the closure's loss. ``value=`` passes the loss without a closure.

        A parameter is stepped iff ``p.grad is not None`` now; a sparse gradient raises ``RuntimeError``
        naming the parameter before any parameter changes. Edits of ``self.state`` made since the last step
        take effect here. Runs outside ``torch.compile`` (dynamo skips it: the JAX step is not traceable).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if value is None:
            value = loss
        self._ensure_runtime()
        if not isinstance(self.state, _LazyState) or self.state._owner() is not self:
            self._adopt_torch_state_object()
        with torch.no_grad():
            for index, rt in enumerate(self._runtime):
                try:
                    for buf in rt.buffers:
                        buf.sync_grads(self)
                except _NeedsRebuild:
                    self._rebuild_group(index)
                    for buf in self._runtime[index].buffers:
                        buf.sync_grads(self)
            # after sync_grads: the flat gradient buffers hold every gradient (zeros where p.grad is None)
            flags = self._nonfinite_precheck(value)
            for index, (rt, group) in enumerate(zip(self._runtime, self.param_groups)):
                entry_name = self._entry_for_group(group)
                requires_value, _ = entry_info(entry_name)
                hyper = self._hyperparams(group)
                static = self._static_items(group)
                v = None
                if requires_value:
                    if value is None:
                        raise RuntimeError(
                            f"{type(self).__name__} needs the loss: call step(closure) or step(value=loss)")
                    v = float(value)
                for buf in rt.buffers:
                    buf.absorb_torch_edits(self, group)
                    buf.step(self, group, entry_name, static, hyper, v,
                             flags.get(index, {}).get(buf.params[0].device))
        return loss

    # ---- checkpoint conversion (torch_bridge.checkpoint) ---------------------------------------
    def _checkpoint_export(self):
        """``(tx, state, params, kwargs)`` of the single param group in the per-tensor (list) layout.

        ``state`` is what the next step would start from, built from the torch-side state exactly as the
        simple path builds it (:meth:`_Buffer.build_state`); ``tx`` is the transformation for any pytree of
        these parameters; ``kwargs`` its factory arguments (for hyperparameter checks).
        """
        group, spec, hyper = self._checkpoint_group()
        self._refresh_state()
        tmp = _SimpleBuffer(list(group["params"]), watch=False)
        tmp.stepped = np.array([bool(dict.get(self.state, p)) for p in tmp.params], dtype=bool)
        device = dlpack.to_jax(tmp.params[0].detach()).devices().pop()
        state = tmp.build_state(self, group, hyper, spec, device)
        return spec.transformation(hyper), state, tmp.params, {**dict(spec.static), **hyper}

    def _checkpoint_import(self, state) -> None:
        """Make the list-layout ``state`` (see :meth:`_checkpoint_export`) this optimizer's state.

        A parameter whose step count (``step`` or a presence counter such as SGD's) is 0 gets no torch-side
        state, as in torch before its first step (torch SGD then starts its buffer from the gradient).
        """
        group, spec, _ = self._checkpoint_group()
        self._refresh_state()
        tmp = _SimpleBuffer(list(group["params"]), watch=False)
        walked = _walk_state(state, tmp._params_def())
        names = self._field_names(walked)
        stepped = np.ones(len(tmp.params), dtype=bool)
        for path, sub, per_param in walked:
            if per_param and (self._is_presence(path) or self._is_scalar_key(names[path] or "")):
                stepped &= np.array([np.asarray(x).reshape(-1)[0] > 0 for x in sub], dtype=bool)
        tmp.state, tmp.spec, tmp.stepped = state, spec, stepped
        tmp.stale = True
        tmp.export(self, group)
        # the torch-side state is now authoritative: every buffer rebuilds its JAX state from it
        for rt in getattr(self, "_runtime", []):
            for buf in rt.buffers:
                buf.forget_jax_state(self)

    def _checkpoint_group(self):
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} has {len(self.param_groups)} param groups; a checkpoint "
                             "conversion maps one group onto one JAX transformation (convert each group's "
                             "parameters with an optimizer of that group alone)")
        group = self.param_groups[0]
        entry_name = self._entry_for_group(group)
        hyper = self._hyperparams(group)
        static = self._static_items(group, policy=False)
        return group, StepSpec(entry_name, static, None), hyper

    @_eager
    def state_dict(self):
        """torch's ``state_dict``, as a snapshot: its tensors are copies, which neither later steps nor edits of
        ``self.state`` change, and changing them does not change the optimizer (torch's hold live references;
        a state dict loaded into another optimizer, which mutates it, must not edit this one's state)."""
        self._refresh_state()
        out = super().state_dict()
        out["state"] = {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                        if isinstance(v, dict) else v for k, v in out["state"].items()}
        return out

    @_eager
    def load_state_dict(self, state_dict) -> None:
        """torch's ``load_state_dict``; the loaded state is checked against this optimizer's configuration
        before anything is replaced (:func:`validate_loaded_state`: ``ValueError`` naming the parameter and
        the key; ``UserWarning`` where torch.optim accepts silently)."""
        reject_complex_state(self, state_dict)
        self.__dict__["_validating_load"] = True
        try:
            torch.optim.Optimizer.load_state_dict(self, state_dict)
        finally:
            self.__dict__.pop("_validating_load", None)

    def _validate_if_loading(self, state) -> None:
        """Called first in ``__setstate__``: validates when the call comes from :meth:`load_state_dict`."""
        if self.__dict__.pop("_validating_load", False):
            validate_loaded_state(self, state["state"], state["param_groups"])

    def _load_spec(self, groups) -> LoadSpec:
        """What the state of ``groups`` (the loaded groups with this optimizer's params) must hold: the keys,
        shapes and dtypes of the JAX state that the next step builds (``init`` traced with
        ``jax.eval_shape``, nothing computed), in the per-tensor layout and under the torch key names."""
        per_param, group_slots, vocabulary = [], [], set(self.state_keys)
        for gi, group in enumerate(groups):
            params = list(group["params"])
            if not params:
                per_param.append([])
                group_slots.append({})
                continue
            try:
                entry = self._entry_for_group(group)
                hyper = self._hyperparams(group)
                static = self._static_items(group)
                spec = StepSpec(entry, static, None)
                template = jax.eval_shape(functools.partial(_compiled_init, spec=spec), jax_shapes(params), hyper)
            except Exception as exc:  # the loaded group's options do not make this optimizer
                raise ValueError(f"{type(self).__name__}.load_state_dict: param group {gi} of the state dict: "
                                 f"its options do not configure {type(self).__name__} "
                                 f"({type(exc).__name__}: {exc})") from exc
            template = _host_template(template)
            walked = _walk_state(template, jax.tree.structure([0] * len(params)))
            names = self._field_names(walked)
            slots = [{} for _ in params]
            gslots = {}
            for path, sub, pp in walked:
                if not pp:
                    key = next((k for k, f in self._group_state_keys().items() if _field_matches(path, f)), None)
                    leaf = np.asarray(sub)
                    gslots[key if key is not None else ("jax_state", _path_name(path))] = StateSlot(
                        tuple(leaf.shape), leaf.dtype)
                    continue
                key = names[path]
                if key is None:
                    continue  # presence counter: no torch key
                vocabulary.add(key)
                for i, p in enumerate(params):
                    leaf = np.asarray(sub[i])
                    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
                    element = (tuple(leaf.shape) == tuple(p.shape) and floating
                               and not (leaf.ndim == 0 and self._is_scalar_key(key)))
                    slots[i][key] = StateSlot(tuple(leaf.shape), leaf.dtype, element)
            per_param.append(slots)
            group_slots.append(gslots)
        return LoadSpec(per_param, frozenset(vocabulary), dict(self._optional_state_keys), group_slots=group_slots)

    def __getstate__(self):
        self._refresh_state()
        out = super().__getstate__()
        out["_entry_name"] = self._entry_name
        out["flat"] = self.flat
        out["write_back"] = getattr(self, "write_back", "copy")
        out["_generic"] = getattr(self, "_generic", False)
        for name in getattr(self, "_persistent_attrs", ()):
            out[name] = getattr(self, name)
        return out

    def __setstate__(self, state) -> None:
        self._validate_if_loading(state)
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in {**_BASE_GROUP_DEFAULTS, **self.group_flag_defaults}.items():
                group.setdefault(key, default)
        raw = self.state
        self.state = _LazyState(self, dict.items(raw) if isinstance(raw, dict) else raw)
        for p_state in dict.values(self.state):
            if "step" in p_state and not torch.is_tensor(p_state["step"]):
                p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)
        self.__dict__.setdefault("_entry_name", self.entry_name)
        self.__dict__.setdefault("flat", True)
        self.__dict__.setdefault("write_back", "copy")
        if "_runtime" not in self.__dict__:
            # unpickled / deep-copied: the params are new objects, adopt them at the next use
            self._init_runtime()
            self._runtime_valid = False
        else:
            # load_state_dict: torch-side state is authoritative; JAX state rebuilt at the next step
            # (copies: torch's load keeps e.g. the source's 'step' tensors, which their owner mutates)
            for p_state in dict.values(self.state):
                for key, value in list(p_state.items()):
                    if torch.is_tensor(value):
                        p_state[key] = value.detach().clone()
            for rt in self._runtime:
                for buf in rt.buffers:
                    buf.forget_jax_state(self)


def raise_if_nonfinite(where: str, param_groups, groups=None, *, tensors=None, value=None) -> None:
    """nonfinite="raise" in torch: ``FloatingPointError`` when ``value`` (the loss, if given) or a gradient of
    the param groups ``groups`` (indices; all by default) is NaN or ±inf, naming the loss or the parameter
    (its param group, index in the group and shape). ``tensors``: what to check (default: every non-None
    ``p.grad``), one finiteness reduction per tensor (:func:`_all_finite`) on the device, read once (one host sync);
    the parameter is located only on failure. Runs before anything is modified."""
    groups = range(len(param_groups)) if groups is None else groups
    if value is not None:
        v = value.detach() if torch.is_tensor(value) else torch.as_tensor(float(value))
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"{where}: nonfinite='raise': the loss {v.item()!r} is not finite; nothing "
                                     "was modified")
    if tensors is None:
        tensors = [p.grad for gi in groups for p in param_groups[gi]["params"] if p.grad is not None]
    if not tensors:
        return
    dev = tensors[0].device
    if bool(torch.stack([_all_finite(t).to(dev) for t in tensors]).all()):
        return
    for gi in groups:
        for j, p in enumerate(param_groups[gi]["params"]):
            g = p.grad
            if g is not None and not bool(torch.isfinite(g).all()):
                raise FloatingPointError(
                    f"{where}: nonfinite='raise': the gradient of parameter {j} of param group {gi} (shape "
                    f"{tuple(p.shape)}) is not finite ({int(torch.isnan(g).sum())} NaN, {int(torch.isinf(g).sum())} "
                    f"inf of {g.numel()} elements); nothing was modified")


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on ``t``'s device: every element of ``t`` is finite. ``t - t`` is exactly 0 for finite
    elements and NaN for NaN/±inf, so one subtraction and one sum decide it (10x faster on CPU than
    ``torch.isfinite(t).all()``, which makes several passes and a bool temporary)."""
    return torch.isfinite(torch.sum(t - t))


def _grad_tensors(buffers) -> list:
    """The gradients the buffers' next step reads (call after ``sync_grads``): a flat buffer's gradient buffer
    (every gradient copied in, zeros where ``p.grad`` is None), else each non-None ``p.grad``."""
    out = []
    for buf in buffers:
        if buf.flat:  # after sync_grads it holds every gradient, zeros where p.grad is None
            out.append(buf.flat_g)
        else:
            out.extend(p.grad for p in buf.params if p.grad is not None)
    return out


def _generic_defaults(entry, hyperparams):
    sig = factory_signature(entry.factory)  # the real defaults, not the StaticDefault wrappers shown to optax
    defaults = {}
    for name, par in sig.parameters.items():
        if name == "segments" or par.kind in (par.VAR_POSITIONAL, par.VAR_KEYWORD):
            continue
        key = "lr" if name == "learning_rate" else name
        if par.default is not inspect.Parameter.empty:
            defaults[key] = par.default
    for name, val in entry.kwargs.items():
        defaults["lr" if name == "learning_rate" else name] = val
    for name, val in hyperparams.items():
        key = "lr" if name == "learning_rate" else name
        if key not in defaults:
            raise TypeError(f"{entry.name} has no argument {name!r}")
        defaults[key] = val
    return defaults


def param_labels(param_groups, params) -> list[str]:
    """How errors name each of ``params``: position in its param group, its name if the group has
    ``param_names``, and its shape."""
    where = {}
    for gi, group in enumerate(param_groups):
        names = group.get("param_names") or [None] * len(group["params"])
        for j, (q, name) in enumerate(zip(group["params"], names)):
            where.setdefault(id(q), (gi, j, name))
    out = []
    for p in params:
        gi, j, name = where.get(id(p), (None, None, None))
        at = f"parameter {j} of param group {gi}" if gi is not None else "a parameter"
        out.append(f"{at} ({'' if name is None else repr(name) + ', '}shape {tuple(p.shape)})")
    return out


def _flat_candidate(p: torch.Tensor) -> bool:
    return (
        p.layout == torch.strided
        and p.is_contiguous()
        and p._base is None
        and p.numel() > 0
        and not p.is_sparse
    )


def _exclude_overlaps(params, flat_ok):
    """Params whose memory overlaps another param's (tied views) must keep their storage: simple path."""
    spans = collections.defaultdict(list)
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        start = p.storage_offset()
        end = start + (p.numel() if p.is_contiguous() else p.untyped_storage().nbytes() // p.element_size())
        spans[p.untyped_storage().data_ptr()].append((start, end, i))
    for group in spans.values():
        group.sort()
        for (s0, e0, i0), (s1, e1, i1) in zip(group, group[1:]):
            if s1 < e0:
                flat_ok[i0] = False
                flat_ok[i1] = False
