"""The JAX <-> torch state mapping of the bridge and the checks of a loaded state dict.

* State walking (shared with :mod:`jaxopt_suite.checkpoint`): which JAX state leaves are per parameter.
* Host/dtype conversions between torch-side state values and JAX leaves (:func:`_scalar_of`,
  :func:`_host_to_torch`, :func:`_host_of_torch`, :func:`_as_tensor`).
* ``load_state_dict`` validation: :class:`StateSlot` / :class:`LoadSpec` describe what a configuration keeps;
  :func:`reject_complex_state` and :func:`validate_loaded_state` check a loaded state dict before anything
  is replaced.
* :class:`_LazyState`, the ``optimizer.state`` mapping refreshed from the JAX state on read.

See the module docstring of :mod:`torch_bridge.optimizer` for the design.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
import weakref
from typing import Any, Hashable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxopt_suite import checkpoint as _ckpt

from . import dlpack

__all__ = ["LoadSpec", "StateSlot", "jax_shapes", "reject_complex_state", "validate_loaded_state"]

#: sentinel for "no value" (a key absent from a state entry; ``_LazyState._refresh`` of every entry)
_MISSING = object()


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
    """``jax.ShapeDtypeStruct`` per torch parameter (for ``jax.eval_shape`` of an ``init``): what JAX sees, the
    real view ``(*shape, 2)`` of a complex parameter (:func:`torch_bridge.dlpack.jax_shape`)."""
    return [jax.ShapeDtypeStruct(dlpack.jax_shape(p), _jax_dtype_for(dlpack.real_dtype(p.dtype))) for p in params]


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
        # a real parameter takes any floating tensor (torch casts it); a complex one a complex tensor only
        # (torch.optim does not cast state for complex parameters, and its step would fail on a real one)
        if _kind(value.dtype) not in ("f", _kind(slot.dtype)) or (_kind(slot.dtype) == "c"
                                                                  and _kind(value.dtype) != "c"):
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
# host conversions between torch-side state values and JAX leaves
# --------------------------------------------------------------------------------------------------


def _as_tensor(value, index: int, param: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(value):
        value = torch.as_tensor(value)
    if value.numel() != param.numel() or (value.dim() and tuple(value.shape) != tuple(param.shape)):
        raise ValueError(
            f"state of parameter {index} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
        )
    return value.detach().to(device=param.device)


def _element_state(value, index: int, param: torch.Tensor, key=None) -> torch.Tensor:
    """A per-element state value (``exp_avg``...) of parameter ``index`` as the real tensor JAX sees: the value
    itself for a real parameter, its real view (:func:`torch_bridge.dlpack.real_view`, shape ``(*shape, 2)``)
    for a complex one. A complex value for a real parameter, or a real one for a complex parameter, is a
    ``ValueError`` (casting would drop the imaginary part, or invent a zero one)."""
    value = _as_tensor(value, index, param)
    if value.is_complex() != param.is_complex():
        what = f"state {key!r}" if key is not None else "state"
        raise ValueError(f"{what} of parameter {index} has dtype {_dtype_name(value.dtype)}, expected "
                         f"{_dtype_name(param.dtype)} (" + ("the parameter is real; casting would drop the "
                                                            "imaginary part)" if value.is_complex() else
                                                            "the parameter is complex: its state is complex, "
                                                            "as in torch.optim)"))
    return dlpack.real_view(value)


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


def hand_out(state) -> dict:
    """What ``state`` (an optimizer's ``self.state``) holds now, to tell edits apart later (:func:`edited_keys`):
    key -> (entry dict, {name: (value, its ``_version`` for a tensor)})."""
    return {key: (entry, {k: (v, v._version if torch.is_tensor(v) else None) for k, v in entry.items()})
            for key, entry in dict.items(state) if isinstance(entry, dict)}


def entry_edited(cur, entry, recorded: dict) -> bool:
    """Whether the state entry ``cur`` differs from the ``entry`` handed out with values ``recorded``
    (name -> (value, ``_version``)): replaced or removed, a value assigned, added or deleted, or a tensor
    changed in place (its ``_version`` moved)."""
    return cur is not entry or len(cur) != len(recorded) or any(
        cur.get(k, _MISSING) is not v or (ver is not None and v._version != ver) for k, (v, ver) in recorded.items())


def edited_keys(state, handed: dict) -> list:
    """The keys of ``state`` whose entry differs from what :func:`hand_out` recorded (:func:`entry_edited`),
    and non-empty new entries."""
    out = [key for key, (entry, recorded) in handed.items() if entry_edited(dict.get(state, key), entry, recorded)]
    return out + [key for key in dict.keys(state) if key not in handed and dict.get(state, key)]


def keep_edits(state, handed: dict, keys) -> dict:
    """For each edited key (:func:`edited_keys`): ``None`` if its entry was removed or emptied, else
    ``(changed values, removed names)`` relative to what was handed out; :func:`restore_edits` puts them back
    after a fresh export has brought every other value up to date."""
    kept = {}
    for key in keys:
        cur = dict.get(state, key)
        if not cur:
            kept[key] = None
            continue
        recorded = handed.get(key, (None, {}))[1]
        changes = {k: v for k, v in cur.items()
                   if k not in recorded or recorded[k][0] is not v
                   or (recorded[k][1] is not None and v._version != recorded[k][1])}
        kept[key] = (changes, [k for k in recorded if k not in cur])
    return kept


def restore_edits(state, kept: dict) -> None:
    for key, k in kept.items():
        if k is None:
            dict.pop(state, key, None)
            continue
        changes, removed = k
        entry = dict.get(state, key)
        if entry is None:
            entry = {}
            dict.__setitem__(state, key, entry)
        entry.update(changes)
        for name in removed:
            entry.pop(name, None)


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
