"""``ELRA`` (alias ``ElraOptimizer``) and ``ElraGradScaler``: :func:`jaxopt_suite.elra` behind the API of the
PyPI package ``elra`` 0.0.5.

ELRA treats *all* trainable tensors of *all* param groups as one global vector (norms, dot products, the
retrace decision), so it keeps one JAX state for the whole optimizer instead of the per-group compiled
steps of :class:`~torch_bridge.optimizer.JaxOptimizer`. Execution:

* the trainable parameters (``requires_grad``) of each dtype are packed into one flat torch buffer (the
  bridge's flat buffers: ``p.data`` and ``p.grad`` become views, JAX reads both by DLPack without copies);
  tensors that cannot be packed (views, overlaps, non-contiguous) use per-tensor DLPack imports;
* one jitted ELRA step (:func:`jaxopt_suite.elra.elra_step_numeric`) per call returns the new parameters,
  written back with one ``copy_`` per buffer; the loss crosses as a Python float or a 0-d tensor by DLPack:
  no ``.item()``;
* the compiled step and init are shared by every instance with the same structure (``classes``,
  ``batch_size``, momentum on/off, parameter shapes): ``lr``, ``weight_decay``, ``warmup`` and the momentum
  value are traced arguments, never compile-time constants;
* a parameter whose ``.grad`` is None takes part with a zero gradient (it still counts in ‖x‖, weight
  decay and retraces).

Differences from the package (its defects, fixed): param groups carry ``'lr'`` so LR schedulers run (and
have no effect); ``add_param_group`` works at any time; ``state_dict``/``load_state_dict`` round-trip
exactly; a NaN gradient or a non-finite loss is a retrace; a first call with a NaN loss is ignored; no
prints and no files.

References:
  Kleinsorge, Kupper, Fauck, Rothe, arXiv:2309.06274 (2023); PyPI ``elra`` 0.0.5.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from jaxopt_suite.nonfinite import all_finite, check_nonfinite
from jaxopt_suite.elra import (
    ElraState,
    _BOOL_FIELDS,
    _INT_FIELDS,
    _FLOAT_FIELDS,
    control_dtype,
    elra,
    elra_boost_init,
    elra_boost_result,
    elra_boost_update,
    elra_next_call_is_real_step,
    elra_numeric,
    elra_step_numeric,
)

from . import _validate as V
from . import _cuda, dlpack
from ._state_map import _LazyState, _warn_user, edited_keys, hand_out, keep_edits, restore_edits
from . import optimizer as _optimizer
from .optimizer import (JaxOptimizer, LoadSpec, StateSlot, _FlatBuffer, _flat_candidate, _exclude_overlaps,
                        _NeedsRebuild, jax_shapes, param_labels, raise_if_nonfinite, sparse_gradient_error)

__all__ = ["ELRA", "ElraOptimizer", "ElraGradScaler"]

_PER_PARAM_KEYS = {"x_lastgood": "x_lastgood", "g_old": "g_old", "coll_grad": "coll_grad", "momentum": "mom"}
_warned_x64 = False


_VECTOR_FIELDS = ("g_old", "x_lastgood", "coll_grad", "mom")


# ``spare`` (unused on purpose) holds the dead vector buffers of the previous call: donated, they receive
# this call's new parameters and vector state. The state itself is read-only here, so XLA needs no copy to
# protect values that are still read while outputs are written (donating the state made it copy buffers).
# Static ``cfg``: only the structure (classes, batch_size); the numbers (weight decay, warmup, momentum) are
# traced ``numeric`` arrays and the learning rate is read by the init only, so instances that differ in
# them share one compiled step. ``skip``: nonfinite="skip" (``skips`` is its counter).
@functools.partial(jax.jit, static_argnames=("cfg", "skip"), donate_argnums=(10,), keep_unused=True)
def _bridge_step(grads, state, params, value, force, train_loss, valid_loss, scale, changed, boost, spare,
                 numeric, skips=None, *, cfg, skip=False):
    del spare
    kw = dict(cfg)
    if scale is not None:
        grads = [g * scale.astype(g.dtype) for g in grads]
    x_new, new = elra_step_numeric(grads, state, params, value=value, numeric=numeric, force_retrace=force,
                                   train_loss=train_loss, valid_loss=valid_loss, **kw)
    new_changed = changed | new.last_moved
    if boost is not None:
        new_boost = elra_boost_update(boost, x_new, value=value, moved=new.last_moved, retraced=new.last_retrace)
    else:
        new_boost = None
    if skip:
        # nonfinite="skip": a non-finite loss, or gradient (unless the call retraces without one), leaves the
        # parameters, the state, the booster and the 'changed' flag as they were (jaxopt_suite.skip_nonfinite)
        ok = jnp.isfinite(value) & (jnp.asarray(force, bool) | all_finite(grads))
        keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(ok, a, b), n, o)  # noqa: E731
        x_new, new, new_changed = keep(x_new, params), keep(new, state), keep(new_changed, changed)
        new_boost = None if boost is None else keep(new_boost, boost)
        skips = jnp.where(ok, skips, optax.safe_increment(skips))
    return x_new, new, new_changed, new_boost, skips


@functools.partial(jax.jit, static_argnames=("cfg",))
def _bridge_init(params, learning_rate, wd0, *, cfg):
    """The fresh state; ``learning_rate`` (the initial alpha) and ``wd0`` (the mapped weight decay) traced.

    The init reads no other number: warmup is unused and momentum only matters as None or not (``cfg``).
    """
    kw = dict(cfg)
    return elra(learning_rate, wd0, 1, 0.0 if kw["momentum_on"] else None, classes=kw["classes"],
                batch_size=kw["batch_size"]).init(params)


_optimizer._STEP_FUNCTIONS.append(_bridge_step)
_optimizer._INIT_FUNCTIONS.append(_bridge_init)


class _SimpleLeaves:
    """Tensors that cannot be packed: imported one by one at every step."""

    def __init__(self, params, labels):
        self.params = params
        self.labels = labels

    def check_sparse(self, opt):
        for p, label in zip(self.params, self.labels):
            if p.grad is not None and p.grad.layout != torch.strided:
                raise sparse_gradient_error(type(opt).__name__, label, p.grad.layout)

    def jax_params(self):
        return [dlpack.to_jax(p) for p in self.params]

    def jax_grads(self):
        return [dlpack.to_jax(p.grad) if p.grad is not None else jnp.zeros(tuple(p.shape), _jax_dtype(p))
                for p in self.params]

    def order_after_torch(self) -> bool:
        """CUDA only: in the ``"sync"`` order (the default, :func:`torch_bridge._cuda.order_mode`) block the host
        on torch's current stream; in ``"dlpack"`` the per-step imports are the handshake. Returns whether the
        outputs must be waited for on the host before torch reads them."""
        p = self.params[0]
        if _cuda.order_for(p) == "sync":
            _cuda.wait_for_torch(p.device)
            return True
        return False

    def write(self, leaves):
        for p, leaf in zip(self.params, leaves):
            p.copy_(dlpack.to_torch(leaf))

    def zero_grad(self, set_to_none):
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def views(self, leaves, i):
        """Torch tensor of parameter ``i`` inside the JAX leaves (a copy)."""
        return dlpack.to_torch(leaves[i]).clone()

    def sync_grads(self):
        pass

    def release(self):
        pass

    @property
    def n_leaves(self):
        return len(self.params)

    def pack(self, tensors):
        """JAX leaves from per-parameter torch tensors (None → zeros)."""
        return [dlpack.to_jax_copy(t.to(p.dtype).reshape(p.shape)) if t is not None else
                jnp.zeros(tuple(p.shape), _jax_dtype(p)) for p, t in zip(self.params, tensors)]


class _FlatLeaves:
    """One flat buffer (one dtype/device): a single JAX leaf aliasing the torch buffer."""

    def __init__(self, params, labels):
        self.buf = _FlatBuffer(params, elementwise=False, labels=labels)
        self.params = params

    def check_sparse(self, opt):
        self.buf.check_sparse(opt)

    def jax_params(self):
        return self.buf.jp

    def jax_grads(self):
        return self.buf.jg

    def order_after_torch(self) -> bool:
        """CUDA only (a no-op on CPU): order the step after torch's current stream (re-import the flat buffer,
        or block the host: :meth:`_FlatBuffer._order_after_torch`). Returns whether the outputs must be
        waited for on the host before torch reads them (host-synchronous order)."""
        if self.buf._cuda_order is None:
            return False
        self.buf._order_after_torch()
        return self.buf._cuda_order == "sync"

    def write(self, leaves):
        view = dlpack.to_torch(leaves[0])
        self.buf.flat_p.copy_(view)
        del view

    def zero_grad(self, set_to_none):
        self.buf.zero_grad(set_to_none)

    def sync_grads(self):
        self.buf.sync_grads()

    def release(self):
        self.buf.release()

    @property
    def n_leaves(self):
        return 1

    def views(self, leaves, i):
        flat = dlpack.to_torch(leaves[0])
        off, n = self.buf.layout.offsets[i], self.buf.layout.numels[i]
        return flat[off:off + n].view(self.params[i].shape).clone()

    def pack(self, tensors):
        out = torch.zeros_like(self.buf.flat_p)
        for i, (p, t) in enumerate(zip(self.params, tensors)):
            if t is not None:
                off, n = self.buf.layout.offsets[i], self.buf.layout.numels[i]
                out[off:off + n].copy_(t.reshape(-1).to(out.dtype))
        return [dlpack.to_jax_copy(out)]


def _jax_dtype(p: torch.Tensor):
    return {torch.float32: jnp.float32, torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16,
            torch.float64: jnp.float64}[p.dtype]


def _to_jax_scalar(x, name: str):
    """A Python number or 0-d tensor as a JAX scalar without host synchronisation."""
    if x is None:
        return jnp.asarray(math.nan, control_dtype())  # same aval as a Python float: no second compile
    if torch.is_tensor(x):
        t = x.detach().reshape(())
        if t.dtype == torch.bool:
            return dlpack.to_jax(t.to(torch.float32)) != 0
        if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            t = t.to(torch.float32)
        if t.dtype == torch.float64 and not dlpack.x64_enabled():
            t = t.to(torch.float32)
        return dlpack.to_jax(t.contiguous())
    if isinstance(x, (bool, np.bool_)):
        return jnp.asarray(bool(x))
    try:
        return jnp.asarray(float(x), control_dtype())
    except TypeError:
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(x).__name__}") from None


class ELRA(JaxOptimizer):
    """ELRA (P2M) as a ``torch.optim.Optimizer`` with the constructor and methods of ``elra.ElraOptimizer``.

    ``ELRA(params, model=None, batch_size=8, classes=0, lr=1e-5, mode=None, dummy=None, momentum=None,
    weight_decay=0.0, warmup=1)``: ``classes < 2`` selects MATH mode (the package default; steps by the
    adaptive alpha), ``classes >= 2`` DNN mode (use the number of classes for classifiers). ``lr`` is only
    the initial alpha; ``weight_decay`` above 0.5 means ``1 − weight_decay``; ``momentum`` falsy = none.
    ``model``, ``mode``, ``dummy`` are accepted and ignored. ``flat=False`` imports every tensor
    separately at each step instead of packing them into flat buffers (same results, slower).

    Typical loop::

        opt.zero_grad(); loss = loss_fn(model(X), y); loss.backward()
        opt.step(loss)            # or opt.step(value=loss), or opt.step(closure)
        ...
        opt.set_train_loss(train_loss); opt.set_valid_loss(valid_loss)   # dynamic weight decay

    ``step_retrace(loss)`` undoes the last step without a gradient (e.g. when the loss exploded).

    ``nonfinite`` (keyword-only, for all groups): ``"propagate"`` (default) is ELRA's own rule, a non-finite
    loss or gradient is a retrace. ``"skip"``: such a call leaves the parameters and the whole state (α, the
    statistics, the booster, ``state['elra']['calls']``) bit-identical and adds 1 to the group key
    ``nonfinite_skips``, decided on the device; with ``force_retrace`` only the loss is checked. ``"raise"``:
    ``FloatingPointError`` naming the loss or the parameter before anything is modified.
    """

    entry_name = None

    def __init__(self, params, model=None, batch_size: int = 8, classes: int = 0, lr: float = 1e-5, mode=None,
                 dummy=None, momentum: Optional[float] = None, weight_decay: float = 0.0, warmup: int = 1, *,
                 flat: bool = True, nonfinite: str = "propagate"):
        del model, mode, dummy  # accepted for compatibility with the package; unused there as well
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("warmup", warmup)):
            V.check_strict(name, value)
        # the package's rule: a falsy momentum (None, 0, False) means none; anything else must be a number
        if momentum is None or (isinstance(momentum, (bool, np.bool_)) and not momentum) or (
                isinstance(momentum, (int, float, np.integer, np.floating)) and momentum == 0) or (
                torch.is_tensor(momentum) and momentum.numel() == 1 and float(momentum) == 0):
            momentum = None
        else:
            V.check_strict("momentum", momentum)
            momentum = float(momentum)
        lr, weight_decay, warmup = (V.scalar(v) for v in (lr, weight_decay, warmup))
        # the JAX factory validates, with messages naming the argument: ranges, and classes/batch_size must be
        # ints (classes=2.5 is no mode; it is not truncated to DNN mode)
        elra(lr, weight_decay, warmup, momentum, classes=classes, batch_size=batch_size)
        # the arguments as given (checkpoint conversion); compiled code only sees the structure
        self._kwargs = dict(learning_rate=float(lr), weight_decay=float(weight_decay), warmup=warmup,
                            momentum=momentum, classes=int(classes), batch_size=int(batch_size))
        self._cfg = (("classes", int(classes)), ("batch_size", int(batch_size)))
        self._numeric = None  # traced numbers of the step (elra_numeric), made on the first call
        global _warned_x64
        if not dlpack.x64_enabled() and not _warned_x64:
            _warned_x64 = True
            warnings.warn("ELRA: JAX x64 is off, so its control arithmetic runs in float32 (the reference "
                          "package uses float64); enable jax_enable_x64 for parity.", stacklevel=2)
        self._runtime = []  # the generic per-group runtime is not used
        self._entry_name = "elra_dnn" if classes >= 2 else "elra_math"
        V.check_flag("flat", flat)
        self.flat = bool(flat)
        self._leaves: list = []  # _FlatLeaves / _SimpleLeaves in global-vector order of their params
        self._order: list = []  # trainable params in global-vector order
        self._jstate: Optional[ElraState] = None
        self._spare = None  # dead buffers of the last call, donated to the next one
        self._changed = None
        self._calls = 0
        self._pending_train = None
        self._pending_valid = None
        self._boost = None
        self._boost_model = None
        self._boost_source = None
        self._needs_import = False
        self._skips = None  # nonfinite="skip" counter (device int32)
        self._skips_base = 0  # its value when the state was last built from the torch side
        torch.optim.Optimizer.__init__(self, params, {"lr": float(lr), "nonfinite": check_nonfinite(nonfinite)})
        # reads of optimizer.state see the current point (exported on read), edits take effect (re-imported)
        self.state = _LazyState(self, dict.items(self.state))

    # ---- parameters -----------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Append a group; its trainable tensors join the global vector (``x_lastgood`` = current values)."""
        if not isinstance(param_group, dict):
            raise TypeError("param_group must be a dict")
        extra = set(param_group) - {"params", "lr"}
        if extra:
            raise ValueError(f"ELRA is one global method: per-group options {sorted(extra)} are not supported "
                             "(only 'params' and 'lr', which ELRA ignores; 'nonfinite' is the constructor's).")
        torch.optim.Optimizer.add_param_group(self, param_group)
        new = [p for p in self.param_groups[-1]["params"] if p.requires_grad]
        # complex parameters raise (ValueError naming the parameter): ELRA's step sizes come from inner
        # products over all parameters, not an elementwise rule (docs/bridge.md, "Complex parameters")
        for p, label in zip(new, param_labels(self.param_groups, new)):
            dlpack.check_dtype(p, owner="ELRA", label=label)
        if not new:
            return
        if self._jstate is not None:
            self._sync_state_to_torch()
            # a complete entry, as the next import builds it (x_lastgood = the current values, the other
            # vectors zero), so that a state_dict taken before the next step loads as it is
            fields = [k for k, f in _PER_PARAM_KEYS.items() if getattr(self._jstate, f) is not None]
            for p in new:
                dict.__setitem__(self.state, p, {k: p.detach().clone() if k == "x_lastgood" else
                                                 torch.zeros_like(p, memory_format=torch.contiguous_format)
                                                 for k in fields})
            self._jstate = None
            self._needs_import = True
        self._order.extend(new)
        self._leaves.extend(self._adopt(new))

    def _adopt(self, params):
        flat_ok = [self.flat and _flat_candidate(p) for p in params]
        _exclude_overlaps(params, flat_ok)
        out = []
        if all(flat_ok):
            by_kind: dict = {}
            for p in params:
                by_kind.setdefault((p.dtype, p.device), []).append(p)
            out = [_FlatLeaves(ps, param_labels(self.param_groups, ps)) for ps in by_kind.values()]
        else:
            out = [_SimpleLeaves(params, param_labels(self.param_groups, params))]
        return out

    def _jax_params(self):
        return [leaf for lv in self._leaves for leaf in lv.jax_params()]

    def _jax_grads(self):
        return [leaf for lv in self._leaves for leaf in lv.jax_grads()]

    def _split(self, leaves):
        out, k = [], 0
        for lv in self._leaves:
            out.append(leaves[k:k + lv.n_leaves])
            k += lv.n_leaves
        return out

    def _refresh_state(self):
        """``optimizer.state`` read (``state[p]``, iteration, ``state_dict``): export the JAX state if it moved
        since the last export, so that reads see the current point as torch.optim's do."""
        if getattr(self, "_jstate", None) is not None and self._jstate is not getattr(self, "_exported_from", None):
            self._sync_state_to_torch()

    def _refresh_entry(self, key) -> None:
        self._refresh_state()  # one export serves every entry (the vectors are split from a few leaves)

    def _absorb_torch_edits(self) -> None:
        """Edits of ``optimizer.state`` (in place, assignment, deletion) take effect at the next call, as in
        torch.optim: the JAX state is re-imported from ``self.state`` (the ``load_state_dict`` path)."""
        handed = getattr(self, "_handed", None)
        if self._jstate is None or not handed:
            return
        edited = edited_keys(self.state, handed)
        if not edited:
            return
        if self._jstate is not self._exported_from:  # the JAX state moved on since those were handed out
            _warn_user("ELRA: optimizer.state was edited on a snapshot read before the last step(); the edited "
                       "values are used as they are (read optimizer.state[p] after step() to edit the current "
                       "state)")
            kept = keep_edits(self.state, handed, edited)
            self._sync_state_to_torch()
            restore_edits(self.state, kept)
        self._jstate = None
        self._needs_import = True
        self._handed = {}

    def _ensure_state(self):
        self._absorb_torch_edits()
        if self._jstate is not None:
            return
        params = self._jax_params()
        fresh = self._fresh_state(params)
        if self._needs_import:
            fresh = self._import_state(fresh)
        # every input of the step committed to the parameters' device from the first call on: a mix of
        # committed and uncommitted arrays is part of jit's cache key and compiled the step up to three times
        device = self._device()
        self._jstate = jax.device_put(fresh, device)
        self._spare = jax.device_put(self._fresh_spare(fresh), device)
        self._changed = jax.device_put(jnp.asarray(False), device)
        k = self._kwargs
        self._numeric = jax.device_put(elra_numeric(k["weight_decay"], k["warmup"], k["momentum"]), device)
        self._skips_base = int(self.param_groups[0].get("nonfinite_skips", 0))
        self._skips = jax.device_put(jnp.asarray(self._skips_base, jnp.int32), device)
        self._needs_import = False
        self._handed = {}  # the torch side was just read in: what it holds is the JAX state's point

    def _init_call(self):
        """``(init, learning_rate, wd0)``: the compiled init with its static configuration bound and its
        traced arguments (the learning rate in the control dtype, the mapped weight decay). The fresh state
        (:meth:`_fresh_state`) and the load spec (:meth:`_load_spec`, ``jax.eval_shape`` of the same call)
        share it, so that what ``load_state_dict`` expects is what the next step builds."""
        k = self._kwargs
        wd0 = elra_numeric(k["weight_decay"])["wd0"]
        cfg = (("classes", k["classes"]), ("batch_size", k["batch_size"]), ("momentum_on", k["momentum"] is not None))
        return (functools.partial(_bridge_init, cfg=cfg), jnp.asarray(k["learning_rate"], control_dtype()), wd0)

    def _fresh_state(self, params) -> ElraState:
        """``elra(...).init(params)`` with the learning rate and weight decay as traced arguments."""
        init, learning_rate, wd0 = self._init_call()
        return init(params, learning_rate, wd0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for lv in self._leaves:
            lv.zero_grad(set_to_none)

    # ---- stepping -------------------------------------------------------------------------------------
    def step(self, loss=None, scale=None, *, value=None, force_retrace=False, closure=None):
        """One ELRA call. The loss comes positionally (float or 0-d tensor), as ``value=`` or from ``closure``.

        ``scale`` multiplies the gradient; ``force_retrace=True`` ignores the gradient and retraces.
        Returns the closure's loss when a closure was used.
        """
        if callable(loss):
            closure, loss = loss, None
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        f = value if value is not None else (loss if loss is not None else result)
        if f is None:
            raise TypeError("ELRA needs the loss: step(loss), step(value=loss) or step(closure)")
        self._call(f, scale=scale, force_retrace=force_retrace, boost=True)
        return result

    def step_retrace(self, loss) -> None:
        """Undo the last step without using a gradient (the package's retrace on an exploded loss)."""
        self._call(loss, scale=None, force_retrace=True, boost=False)

    def step_noscale(self, loss, grad: Optional[torch.Tensor] = None) -> None:
        """A step with the gradient given as one flat tensor in global-vector order (or from ``.grad``)."""
        if grad is not None:
            sizes = [p.numel() for p in self._order]
            if grad.numel() != sum(sizes):
                raise ValueError(f"grad has {grad.numel()} elements, the parameters {sum(sizes)}")
            with torch.no_grad():
                for p, chunk in zip(self._order, grad.detach().reshape(-1).split(sizes)):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(chunk.view(p.shape))
        self._call(loss, scale=None, force_retrace=False, boost=True)

    def _call(self, loss, *, scale, force_retrace, boost):
        if self._calls == 0 and isinstance(loss, (int, float)) and not isinstance(loss, bool) and loss <= 0:
            raise ValueError(f"ELRA needs a positive loss at the first step, got {loss!r}")
        if not self._order:
            raise ValueError("ELRA has no trainable parameters")
        with torch.no_grad():
            for lv in self._leaves:
                lv.check_sparse(self)
            try:
                for lv in self._leaves:
                    lv.sync_grads()
            except _NeedsRebuild:
                self._readopt()
            policy = self._nonfinite_policy()
            if policy == "raise":
                self._raise_if_nonfinite_elra(loss, force_retrace)
            host_sync = [lv.order_after_torch() for lv in self._leaves]  # CUDA stream order (_cuda)
            self._ensure_state()
            value = _to_jax_scalar(loss, "loss")
            force = _to_jax_scalar(force_retrace, "force_retrace").astype(bool)
            tl = _to_jax_scalar(self._pending_train, "train loss")
            vl = _to_jax_scalar(self._pending_valid, "valid loss")
            self._pending_train = self._pending_valid = None
            sc = None if scale is None else _to_jax_scalar(scale, "scale")
            bs = self._boost if boost else None
            old, spare, self._spare = self._jstate, self._spare, None
            skip = policy == "skip"
            x_new, self._jstate, self._changed, bs, skips = _bridge_step(
                self._jax_grads(), old, self._jax_params(), value, force, tl, vl, sc, self._changed, bs, spare,
                self._numeric, self._skips if skip else None, cfg=self._cfg, skip=skip)
            if skip:
                self._skips = skips
            if boost and bs is not None:
                self._boost = bs
            if any(host_sync):
                _cuda.wait_for_jax((x_new, self._jstate))
            for lv, leaves in zip(self._leaves, self._split(x_new)):
                lv.write(leaves)
            # the old vector state and the written-back parameters are dead now: next call's outputs
            self._spare = self._next_spare(old, x_new)
        self._calls += 1

    def _device(self):
        return next(iter(self._jax_params()[0].devices()))

    def _nonfinite_policy(self) -> str:
        return check_nonfinite(self.param_groups[0].get("nonfinite", "propagate"))

    def _raise_if_nonfinite_elra(self, loss, force_retrace) -> None:
        """nonfinite="raise": ``FloatingPointError`` naming the loss or the parameter (one host sync)."""
        if force_retrace is True:  # the gradient is not used, only the loss
            raise_if_nonfinite("ELRA.step", self.param_groups, [], value=loss)
        else:
            raise_if_nonfinite("ELRA.step", self.param_groups, value=loss,
                               tensors=[p.grad for p in self._order if p.grad is not None])

    def _fresh_spare(self, state: ElraState):
        """Scratch buffers shaped like the vector state and the parameters (donated to the next step)."""
        return (tuple(None if getattr(state, k) is None else jax.tree.map(jnp.zeros_like, getattr(state, k))
                      for k in _VECTOR_FIELDS), [jnp.zeros_like(leaf) for leaf in self._jax_params()])

    def _next_spare(self, old: ElraState, x_new):
        live = {id(leaf) for leaf in jax.tree.leaves(self._jstate)}
        if self._boost is not None:
            live.update(id(leaf) for leaf in jax.tree.leaves(self._boost))

        def dead(leaf):
            # an output that JAX forwarded from an input must not be donated
            return leaf if id(leaf) not in live else jax.device_put(jnp.zeros_like(leaf), leaf.sharding)

        return (tuple(None if getattr(old, k) is None else jax.tree.map(dead, getattr(old, k))
                      for k in _VECTOR_FIELDS), [dead(leaf) for leaf in x_new])

    def _readopt(self):
        self._sync_state_to_torch()
        for lv in self._leaves:
            lv.release()
        self._leaves = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.requires_grad]
            if ps:
                self._leaves.extend(self._adopt(ps))
        self._jstate = None
        self._needs_import = True

    # ---- dynamic weight decay, queries ---------------------------------------------------------------
    def set_train_loss(self, loss, boost=None) -> None:
        """Full training loss (e.g. once per epoch); with ``set_valid_loss`` it steers the weight decay."""
        del boost
        self._pending_train = loss

    def set_valid_loss(self, loss, boost=None, accu=None) -> None:
        """Validation loss (e.g. once per epoch); dynamic decay needs both losses and ``weight_decay > 0``."""
        del boost, accu
        self._pending_valid = loss

    def check_next_step(self) -> tuple[bool, int]:
        """``(real, collects)``: whether the next call with a gradient moves the parameters (host sync)."""
        if self._jstate is None:
            return True, 0 if self._kwargs["classes"] >= 2 else 1
        real, collects = elra_next_call_is_real_step(self._jstate)
        return bool(real), int(collects)

    def get_gradient(self) -> torch.Tensor:
        """The gradient as one flat tensor in global-vector order (zeros for missing gradients)."""
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                          for p in self._order])

    def get_param(self, only_new: bool = True, device=None) -> Optional[torch.Tensor]:
        """The parameters as one flat tensor (a copy); ``None`` if ``only_new`` and nothing moved since."""
        if only_new:
            if self._changed is None or not bool(self._changed):
                return None
        self._changed = jax.device_put(jnp.asarray(False), self._device())
        flat = torch.cat([p.detach().reshape(-1) for p in self._order]).clone()
        return flat if device is None else flat.to(device)

    # ---- booster ---------------------------------------------------------------------------------------
    def get_boost_model(self, enable: bool, model=None, device=None):
        """Averaged parameters in a copy of ``model`` for logging: ``(count, loss, model_copy)``.

        The first call with ``enable=True`` copies ``model`` and starts averaging (returns ``(0, 0.0,
        None)``); later calls (once per epoch) return the average of the last window, or ``(0, 0.0, None)``.
        ``enable=False`` stops averaging. Never changes the optimization.
        """
        if not enable:
            self._boost, self._boost_model, self._boost_source = None, None, None
            return 0, 0.0, None
        if self._boost_model is None:
            if model is None:
                raise ValueError("get_boost_model(True, model): the first call needs the model")
            self._boost_source = model
            self._boost_model = copy.deepcopy(model)
            if device is not None:
                self._boost_model.to(device)
            for lv in self._leaves:  # CUDA: the init reads the parameters torch wrote (_cuda)
                lv.order_after_torch()
            self._boost = jax.jit(elra_boost_init)(self._jax_params())
            return 0, 0.0, None
        if self._boost is None:
            for lv in self._leaves:  # CUDA: the init reads the parameters torch wrote (_cuda)
                lv.order_after_torch()
            self._boost = jax.jit(elra_boost_init)(self._jax_params())
            return 0, 0.0, None
        self._boost, count, loss, full, available = jax.jit(elra_boost_result)(self._boost)
        if not bool(available):
            return 0, 0.0, None
        src = model if model is not None else self._boost_source
        index = {id(p): i for i, p in enumerate(src.parameters())}
        targets = list(self._boost_model.parameters())
        with torch.no_grad():
            for lv, leaves in zip(self._leaves, self._split(list(full))):
                for i, p in enumerate(lv.params):
                    if id(p) in index:
                        targets[index[id(p)]].copy_(lv.views(leaves, i))
            for b_copy, b in zip(self._boost_model.buffers(), src.buffers()):
                b_copy.copy_(b)
        return int(count), float(loss), self._boost_model

    def get_boost_model_prev(self):
        """The model copy last returned by :meth:`get_boost_model` (or None)."""
        return self._boost_model

    def step_allinone(self, *args, **kwargs):
        raise NotImplementedError("step_allinone is a debugging helper of the reference package")

    def set_param(self, *args, **kwargs):
        raise NotImplementedError("set_param is a debugging helper of the reference package")

    def get_boost_future(self, *args, **kwargs):
        raise NotImplementedError("get_boost_future is a debugging helper of the reference package")

    def set_lgs_device(self, *args, **kwargs):
        raise NotImplementedError("set_lgs_device is a debugging helper of the reference package")

    # ---- state_dict ------------------------------------------------------------------------------------
    def _sync_state_to_torch(self):
        """Write the JAX state into ``self.state`` in torch format (per-param tensors, scalars under 'elra')."""
        st = self._jstate
        if st is None:
            return
        st_host = jax.device_get(st._replace(g_old=None, x_lastgood=None, coll_grad=None, mom=None))
        for key, field in _PER_PARAM_KEYS.items():
            tree = getattr(st, field)
            if tree is None:
                continue
            for lv, leaves in zip(self._leaves, self._split(list(tree))):
                for i, p in enumerate(lv.params):
                    entry = dict.get(self.state, p) or {}
                    entry[key] = lv.views(leaves, i)
                    dict.__setitem__(self.state, p, entry)
        scalars = {}
        for name in _FLOAT_FIELDS + _INT_FIELDS + _BOOL_FIELDS:
            v = np.asarray(getattr(st_host, name))
            if name in _BOOL_FIELDS:
                scalars[name] = torch.tensor(bool(v))
            elif name in _INT_FIELDS:
                scalars[name] = torch.tensor(int(v), dtype=torch.int64)
            else:
                scalars[name] = torch.tensor(float(v), dtype=torch.float64)
        scalars["xaver_list"] = torch.from_numpy(np.array(st_host.xaver_list, np.float32))
        calls = self._calls
        if self._skips is not None and self._nonfinite_policy() == "skip":
            skips = int(self._skips)
            calls -= skips - self._skips_base  # a skipped call leaves the state as it was, 'calls' included
            for group in self.param_groups:
                group["nonfinite_skips"] = skips
        scalars["calls"] = torch.tensor(calls, dtype=torch.int64)
        dict.__setitem__(self.state, "elra", scalars)
        self._exported_from = st
        self._handed = hand_out(self.state)

    def _import_state(self, fresh: ElraState) -> ElraState:
        """The JAX state from ``self.state`` (after ``load_state_dict`` or ``add_param_group``)."""
        scal = dict.get(self.state, "elra")
        d = fresh._asdict()
        if scal:
            for name in _FLOAT_FIELDS + _INT_FIELDS + _BOOL_FIELDS:
                if name in scal:
                    v = scal[name]
                    v = v.item() if torch.is_tensor(v) else v
                    d[name] = jnp.asarray(v, dtype=fresh._asdict()[name].dtype)
            if "xaver_list" in scal:
                d["xaver_list"] = jnp.asarray(np.asarray(scal["xaver_list"], np.float32))
            if "calls" in scal:
                self._calls = int(scal["calls"])
        for key, field in _PER_PARAM_KEYS.items():
            if d[field] is None:
                continue
            leaves = []
            for lv in self._leaves:
                tensors = []
                for p in lv.params:
                    entry = dict.get(self.state, p) or {}
                    t = entry.get(key)
                    if t is None and key == "x_lastgood":
                        t = p.detach()
                    tensors.append(t)
                leaves.extend(lv.pack(tensors))
            d[field] = leaves
        return ElraState(**d)

    # ---- checkpoint conversion (torch_bridge.checkpoint) ---------------------------------------------
    def _checkpoint_export(self):
        """``(tx, state, params, kwargs)``: the JAX state in the per-tensor (list) layout, built from the
        torch-side state as the next call would build it (see ``JaxOptimizer._checkpoint_export``)."""
        self._sync_state_to_torch()
        saved = self._leaves
        self._leaves = [_SimpleLeaves(list(self._order), param_labels(self.param_groups, list(self._order)))]
        try:
            state = self._import_state(self._fresh_state(self._jax_params()))
        finally:
            self._leaves = saved
        kw = dict(self._kwargs)
        tx = elra(kw["learning_rate"], kw["weight_decay"], kw["warmup"], kw["momentum"], classes=kw["classes"],
                  batch_size=kw["batch_size"])
        return tx, state, list(self._order), kw

    def _checkpoint_import(self, state) -> None:
        """Make the list-layout ``state`` this optimizer's state (torch side authoritative afterwards)."""
        self._sync_state_to_torch()
        saved = self._leaves
        self._leaves = [_SimpleLeaves(list(self._order), param_labels(self.param_groups, list(self._order)))]
        try:
            self._jstate = state
            self._sync_state_to_torch()
        finally:
            self._leaves = saved
        self._jstate = None
        self._needs_import = True
        # the host-side call counter (it guards the first call's positive-loss check): the calls that
        # stepped plus those skipped, which the JAX state counts
        self._calls = int(np.asarray(state.step_cnt)) + int(np.asarray(state.skipped))
        dict.__getitem__(self.state, "elra")["calls"] = torch.tensor(self._calls, dtype=torch.int64)

    def state_dict(self):
        """torch's ``state_dict`` of the current point, as a **snapshot**: nothing in it changes afterwards.

        ``sd = opt.state_dict()`` kept in memory stays the state at the call that made it: every later step
        and ``state_dict()`` call writes new tensors and new dicts into ``self.state`` (the per-parameter
        vectors and the scalars under ``'elra'`` are exported from the JAX state each time), and the dicts
        returned here are copies, so the kept entries never mix two points of training.

        torch's own optimizers return references instead: ``torch.optim.Adam``'s ``state_dict()['state']``
        holds its live ``exp_avg``/``step`` tensors, which later steps update in place, so a kept torch
        ``state_dict`` follows training (all of it, consistently; ``copy.deepcopy`` makes a snapshot). ELRA's
        state lives in JAX and is exported, so a live view is not available; a snapshot is the consistent
        choice (and what ``torch.save(opt.state_dict(), ...)`` writes in either case).
        """
        self._sync_state_to_torch()
        sd = torch.optim.Optimizer.state_dict(self)
        # torch packs self.state's per-parameter dicts themselves; the next export updates those dicts
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return sd

    def _load_spec(self, groups) -> LoadSpec:
        """Per trainable parameter the vector fields of this configuration; ``state['elra']`` the scalars."""
        trainable = [p for g in groups for p in g["params"] if p.requires_grad]
        if not trainable:
            return LoadSpec([[None] * len(g["params"]) for g in groups], frozenset(_PER_PARAM_KEYS),
                            group_slots=[{} for _ in groups])
        init, learning_rate, wd0 = self._init_call()
        fresh = jax.eval_shape(init, jax_shapes(trainable), learning_rate, wd0)
        keys = [k for k, f in _PER_PARAM_KEYS.items() if getattr(fresh, f) is not None]
        per_param = [[{k: StateSlot(tuple(p.shape), p.dtype, True) for k in keys} if p.requires_grad else None
                      for p in g["params"]] for g in groups]
        scalars = {name: StateSlot((), getattr(fresh, name).dtype) for name in _FLOAT_FIELDS + _INT_FIELDS + _BOOL_FIELDS}
        scalars["xaver_list"] = StateSlot(tuple(fresh.xaver_list.shape), np.float32)
        scalars["calls"] = StateSlot((), np.int64)
        return LoadSpec(per_param, frozenset(_PER_PARAM_KEYS), globals_={"elra": scalars}, globals_required=True,
                        group_slots=[{} for _ in groups])

    def load_state_dict(self, state_dict) -> None:
        JaxOptimizer.load_state_dict(self, state_dict)  # validates (see _load_spec), then torch's load
        for p_state in dict.values(self.state):
            for key, value in list(p_state.items()):
                if torch.is_tensor(value):
                    p_state[key] = value.detach().clone()
        self._jstate = None
        self._needs_import = True

    def __setstate__(self, state) -> None:
        # torch's load_state_dict ends here; the generic bridge's per-group bookkeeping does not apply
        self._validate_if_loading(state)
        torch.optim.Optimizer.__setstate__(self, state)
        raw = self.state
        if not isinstance(raw, _LazyState):
            self.state = _LazyState(self, dict.items(raw) if isinstance(raw, dict) else raw)

    def __getstate__(self):
        raise TypeError("pickle ELRA through state_dict() / load_state_dict()")


ElraOptimizer = ELRA


def _check_scaler(init_scale, growth_factor, backoff_factor, growth_interval, loss_limit, enabled) -> None:
    """ElraGradScaler's arguments, each named: finite ``init_scale > 0``, finite ``growth_factor > 1``,
    finite ``0 < backoff_factor < 1``, integer ``growth_interval >= 1``, ``loss_limit > 0`` (``+inf``: never
    force a retrace for size), ``enabled`` a bool."""
    for name, value in (("init_scale", init_scale), ("growth_factor", growth_factor),
                        ("backoff_factor", backoff_factor)):
        V.check_strict(name, value)
    if not float(init_scale) > 0.0:
        raise ValueError(f"Invalid init_scale: {init_scale}; init_scale must be > 0")
    if not float(growth_factor) > 1.0:
        raise ValueError(f"Invalid growth_factor: {growth_factor}; growth_factor must be > 1")
    if not 0.0 < float(backoff_factor) < 1.0:
        raise ValueError(f"Invalid backoff_factor: {backoff_factor}; backoff_factor must be in (0, 1)")
    if isinstance(growth_interval, (bool, np.bool_)) or not isinstance(growth_interval, (int, np.integer)):
        raise TypeError(f"growth_interval must be an int, got {growth_interval!r} ({type(growth_interval).__name__})")
    if growth_interval < 1:
        raise ValueError(f"Invalid growth_interval: {growth_interval}; growth_interval must be >= 1")
    V.check_number("loss_limit", loss_limit)
    if isinstance(loss_limit, (bool, np.bool_)):
        raise TypeError(f"loss_limit must be a real number, got the bool {loss_limit!r}")
    if math.isnan(float(loss_limit)) or not float(loss_limit) > 0.0:
        raise ValueError(f"Invalid loss_limit: {loss_limit}; loss_limit must be > 0 (+inf: no limit)")
    V.check_flag("enabled", enabled)


class ElraGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that passes the loss to ELRA: ``scaler.scale(loss).backward();
    scaler.step(opt); scaler.update()``.

    ``step`` unscales and checks the gradients like ``GradScaler``; with finite gradients it calls
    ``opt.step(value=loss, force_retrace=(loss >= loss_limit) | ~isfinite(loss))`` (no host sync), else
    it skips the optimizer call as ``GradScaler`` does.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, loss_limit: float = 65000.0, enabled: bool = True, device=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        _check_scaler(init_scale, growth_factor, backoff_factor, growth_interval, loss_limit, enabled)
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor,
                         backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)
        self.loss_limit = float(loss_limit)
        self._last_loss = None

    def scale(self, outputs):
        if torch.is_tensor(outputs):
            self._last_loss = outputs.detach()
        return super().scale(outputs)

    def step(self, optimizer, *args, **kwargs):
        if isinstance(optimizer, ELRA) and "value" not in kwargs and not args:
            loss = self._last_loss
            if loss is None:
                raise RuntimeError("ElraGradScaler.step: call scaler.scale(loss) first")
            kwargs["value"] = loss
            kwargs["force_retrace"] = (loss >= self.loss_limit) | ~torch.isfinite(loss)
        return super().step(optimizer, *args, **kwargs)
