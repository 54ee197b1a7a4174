"""``JaxOptimizer``: any registry optimizer as a real ``torch.optim.Optimizer``.

The math runs in JAX (one compiled step per buffer, shared across instances); the parameters and
gradients stay torch tensors that JAX reads through DLPack without copies.

How a step works (flat path, the default)
-----------------------------------------
* Per param group and per (dtype, device), the parameters are packed into one flat torch buffer; each
  parameter is a segment padded with zeros to 64 bytes, 256 on CUDA (:class:`jaxopt_suite.FlatLayout`). ``p.data``
  is re-pointed to a view of the flat parameter buffer (``id(p)`` does not change); a flat gradient buffer
  of the same layout holds the gradients the step reads. Both buffers are imported into JAX once (on CUDA
  re-imported per step in the ``dlpack`` stream order, see "On CUDA" below).
* Gradients follow torch exactly: a parameter is stepped iff ``p.grad is not None`` at ``step()``, and
  ``p.grad`` is None wherever torch leaves it None (before the first backward, after
  ``zero_grad(set_to_none=True)``, for parameters that got no gradient). A parameter whose ``.grad`` is
  None is skipped as torch skips it (no decay, no state change, per-parameter step counts); the mask is
  read from ``p.grad`` at each step, so every way of producing gradients counts: backward (with
  accumulation over micro-batches), ``p.grad = g``, in-place ``p.grad.copy_/add_``, ``autograd.grad`` or
  ``torch.func`` results, GradScaler's unscale, ``clip_grad_norm_``, DDP's views.
* At ``step()`` each non-None ``.grad`` that is not already its segment of the flat gradient buffer (same
  data pointer, dtype, shape and strides) is copied in, all together with one ``torch._foreach_copy_``.
  A copied ``.grad`` that is still ``p.grad`` at the next step (it survived ``zero_grad(set_to_none=False)``
  or is accumulated across steps) is re-pointed to its segment then (values unchanged, same tensor object);
  from the step after, accumulation into it is zero-copy. Cost: at most one copy of the gradients per step.
  The default loop ``zero_grad(); backward(); step()`` pays it (torch allocates fresh ``.grad`` tensors
  after ``set_to_none=True``, and they are not re-pointed: ``zero_grad()`` drops them).
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

Complex parameters (elementwise classes only; the others raise ``ValueError`` naming the parameter when the
group is added) are stepped as torch.optim steps them, as their real view ``torch.view_as_real(p)``: JAX sees
a real array of shape ``(*p.shape, 2)`` (in a flat buffer, ``2 * numel`` reals of the component dtype, shared
with the real parameters of that dtype; ``p.data`` and the gradient segment are ``view_as_complex`` views of
it), and the per-element state is exported as complex tensors of ``p``'s shape (imported back through their
real view, so edits of them take effect like any other). See :mod:`torch_bridge.dlpack`.

On CUDA (``torch_bridge/_cuda.py``, ``docs/gpu.md``)
-------------------------------------------------
* The flat buffers are allocated on the parameters' device, 256-byte aligned (64 on the CPU), and each
  import is checked to be zero-copy. Importing the bridge sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false``
  unless the user chose a JAX memory policy (warns once if JAX's GPU backend already started).
* torch and XLA queue kernels on different streams, so each step needs two edges: JAX after torch's
  current stream (the backward, the gradient copy), torch's next kernels after JAX's step. Default:
  host-synchronous (``current_stream().synchronize()`` before the step, ``block_until_ready`` on its
  outputs after), correct whatever JAX's stream semantics. ``TORCH_BRIDGE_CUDA_ORDER=dlpack``: both edges
  through DLPack handshakes, no host block -- the flat buffers are re-imported at each step (a buffer
  imported once orders nothing after its import) and ``torch.from_dlpack`` of the new parameters makes
  torch's stream wait for the step. CPU buffers decide this once at construction (``_cuda_order is
  None``) and run no CUDA code per step.

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

Where the code is
-----------------
* ``torch_bridge/optimizer.py`` (this module): :class:`JaxOptimizer` (construction and group validation,
  adoption of params into buffers, ``step`` / ``zero_grad``, ``state_dict`` / ``load_state_dict``, pickling,
  checkpoint conversion) and the non-finite check in torch (:func:`raise_if_nonfinite`).
* ``torch_bridge/_step_cache.py``: :class:`StepSpec`, the jitted step and init shared by every instance, and
  :func:`compiled_step_cache_size` / :func:`compiled_init_cache_size`.
* ``torch_bridge/_state_map.py``: the JAX <-> torch state mapping (state walk, host and dtype conversions),
  ``load_state_dict`` validation (:class:`StateSlot`, :class:`LoadSpec`, :func:`validate_loaded_state`,
  :func:`reject_complex_state`) and the lazily refreshed ``optimizer.state`` (``_LazyState``).
* ``torch_bridge/_buffers.py``: the flat and simple buffers (``_FlatBuffer``, ``_SimpleBuffer``) and the
  sparse-gradient watch.
* ``torch_bridge/_cuda.py``: what differs on CUDA (JAX's preallocation, alignment, stream order).

The names other modules use are re-exported here (``from torch_bridge.optimizer import StepSpec`` works).
"""

from __future__ import annotations

import collections
import functools
import inspect
import warnings
from typing import Any, ClassVar, Hashable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxopt_suite import registry
from jaxopt_suite._common import INIT_ONLY_ATTR, factory_signature
from jaxopt_suite.nonfinite import check_nonfinite

from . import _validate as V
from . import dlpack
# The parts of the bridge, one job per module; the names are re-exported here, where the other bridge
# modules (elra, enhanced_sgd, lookahead...) and users import them from.
from ._buffers import (SIMPLE_PATH_WARN_LEAVES, _exclude_overlaps, _flat_candidate, _FlatBuffer,  # noqa: F401
                       _NeedsRebuild, _SimpleBuffer, sparse_gradient_error)
from ._state_map import (_BASE_GROUP_DEFAULTS, _BASE_GROUP_STATE_KEYS, _field_matches, _host_of_torch,  # noqa: F401
                         _host_template, _host_to_torch, _LazyState, _path_name, _walk_state,
                         LoadSpec, StateSlot, jax_shapes, reject_complex_state, validate_loaded_state)
from ._step_cache import (_INIT_FUNCTIONS, _STEP_FUNCTIONS, StepSpec, _compiled_init,  # noqa: F401
                          compiled_init_cache_size, compiled_step_cache_size, entry_info)

__all__ = ["JaxOptimizer", "LoadSpec", "StateSlot", "StepSpec", "compiled_init_cache_size",
           "compiled_step_cache_size", "entry_info", "raise_if_nonfinite", "validate_loaded_state"]


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
        params = list(group["params"])
        self._check_complex(params, param_labels(self.param_groups, params))
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

    def _check_complex(self, params, labels) -> None:
        """Complex parameters: stepped as their real view (torch.optim's rule) by elementwise classes; any
        other class raises ``ValueError`` naming the parameter (see docs/bridge.md, "Complex parameters").
        Run when a group is added; the other dtype checks run when the parameters are adopted (first step)."""
        for p, label in zip(params, labels):
            if p.is_complex() and not self.elementwise:
                dlpack.check_dtype(p, owner=type(self).__name__, label=label)

    def _adopt_group(self, group) -> _GroupRuntime:
        params = list(group["params"])
        for p, label in zip(params, param_labels(self.param_groups, params)):
            dlpack.check_dtype(p, allow_complex=self.elementwise, owner=type(self).__name__, label=label)
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
                if ok:  # a complex parameter shares the buffer of its component dtype (as its real view)
                    by_kind.setdefault((dlpack.real_dtype(p.dtype), p.device), []).append(p)
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
        for p, label in zip(group["params"], param_labels(self.param_groups, group["params"])):
            if p.is_complex():
                # the bridge keeps a complex parameter's state as real (re, im) views, a JAX transformation
                # on complex leaves keeps complex state: no one-to-one conversion is defined (yet)
                raise ValueError(f"{type(self).__name__}: {label} is complex ({str(p.dtype).replace('torch.', '')}); "
                                 "checkpoint conversion between the bridge and JAX supports real parameters only")
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
                    element = (tuple(leaf.shape) == dlpack.jax_shape(p) and floating
                               and not (leaf.ndim == 0 and self._is_scalar_key(key)))
                    if element and p.is_complex():  # JAX keeps the real view; torch sees a complex tensor
                        slots[i][key] = StateSlot(tuple(p.shape), p.dtype, True)
                    else:
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

