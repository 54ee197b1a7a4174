"""The bridge's parameter buffers: where the parameters and gradients live and how a step runs on them.

:class:`_FlatBuffer`: one flat torch buffer per (param group, dtype, device), ``p.data`` / ``p.grad`` its
views, imported into JAX once (uniform and segment mode). :class:`_SimpleBuffer`: the per-tensor path (views,
overlapping or non-contiguous parameters, ``flat=False``). Both convert their JAX state to and from the
torch-side ``optimizer.state`` (:class:`_Buffer`), watch for sparse gradients and pick their parameters with
:func:`_flat_candidate` / :func:`_exclude_overlaps`. See the module docstring of :mod:`torch_bridge.optimizer`.
"""

from __future__ import annotations

import collections
import functools
import warnings
import weakref
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxopt_suite._common import FlatLayout

from . import _cuda, dlpack
from ._state_map import (_element_state, _rebuild_state, _scalar_of, _walk_state, _warn_user, entry_edited,
                         keep_edits, restore_edits)
from ._step_cache import StepSpec, _compiled_init, _compiled_step

__all__ = ["SIMPLE_PATH_WARN_LEAVES", "sparse_gradient_error"]

SIMPLE_PATH_WARN_LEAVES = 400


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
        return entry_edited(dict.get(opt.state, self.params[i]), entry, recorded)

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
        # an entry removed or emptied: the parameter starts afresh, as in torch (keep_edits records None)
        kept = keep_edits(opt.state, {self.params[i]: self.handed[i] for i in edited}, [self.params[i] for i in edited])
        self._export(opt, group, None)  # every other snapshot up to date (the edited keys are put back below)
        restore_edits(opt.state, kept)
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
    """Params of one dtype/device packed into one flat torch buffer; p.data / p.grad are its views.

    A complex parameter joins the buffer of its component dtype (complex64 with float32) as its real view:
    its segment holds ``2 * numel`` reals (``(re, im)`` pairs), ``p.data`` / its gradient segment are
    ``view_as_complex`` of that segment, and its per-element state is exported as complex tensors.
    """

    flat = True

    def __init__(self, params, elementwise: bool, write_back: str = "copy", labels=None):
        super().__init__(params, labels)
        self.write_back = write_back
        dtype, device = dlpack.real_dtype(params[0].dtype), params[0].device
        self.elementwise = elementwise
        # segments of the real views (a complex parameter: (*shape, 2)), padded per platform (64 B CPU,
        # 256 B CUDA: _cuda.segment_align_elements); offsets are multiples of that granule, hence even, so
        # view_as_complex of a segment is always valid
        self.layout = FlatLayout.from_shapes([dlpack.jax_shape(p) for p in params],
                                             _cuda.segment_align_elements(dtype, device))
        total = self.layout.total
        # on the parameters' device, aligned for a zero-copy import there (64 bytes CPU, 256 CUDA)
        self.flat_p = _cuda.aligned_zeros(total, dtype, device)
        self.flat_g = _cuda.aligned_zeros(total, dtype, device)
        self.filled = np.zeros(len(params), dtype=bool)  # segment of flat_g may hold non-zero values
        self.aliased: list = [None] * len(params)  # weakref to the .grad tensor moved onto segment i (_alias)
        self.copied: list = [None] * len(params)  # weakref to the .grad tensor copied into segment i last step
        self.pviews, self.gviews, self.ptrs = [], [], []
        self.mode = "uniform" if elementwise else "segment"
        with torch.no_grad():
            for i, p in enumerate(params):
                off, n = self.layout.offsets[i], self.layout.numels[i]
                pv = dlpack.from_real(self.flat_p[off:off + n].view(dlpack.jax_shape(p)), p)
                gv = dlpack.from_real(self.flat_g[off:off + n].view(dlpack.jax_shape(p)), p)
                pv.copy_(p.detach())
                p.data = pv
                self.pviews.append(pv)
                self.gviews.append(gv)
                self.ptrs.append(pv.data_ptr())
        on_cuda = device.type == "cuda"  # decided once: a CPU buffer never runs CUDA code per step
        to_jax = _cuda.import_zero_copy if on_cuda else functools.partial(dlpack.to_jax, zero_copy=True)
        self.jp = [to_jax(self.flat_p)]
        self.jg = [to_jax(self.flat_g)]
        self.device = next(iter(self.jp[0].devices()))
        # None on CPU; on CUDA how JAX's step is ordered against torch's stream ("dlpack" / "sync", _cuda)
        self._cuda_order = _cuda.order_mode(self.device, swap=write_back == "swap") if on_cuda else None
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
                pv = dlpack.from_real(flat_p[off:off + n].view(dlpack.jax_shape(p)), p)
                p.data = pv
                self.pviews[i] = pv
                self.ptrs[i] = pv.data_ptr()

    def jax_params(self):
        return self.jp

    def _order_after_torch(self) -> None:
        """CUDA only, at the start of a step: make this step's JAX work wait for the kernels torch queued on
        its current stream (the backward, the gradient copy, ``zero_grad``, edits of ``p.data``).

        ``"dlpack"``: re-import both flat buffers (the DLPack handshake: an event on torch's current stream that
        the imported buffers' definition waits on; the step waits on its inputs, so on all of it). No host
        block; one capsule per buffer. ``"sync"``: block the host on torch's current stream."""
        if self._cuda_order == "dlpack":
            self.jp = [_cuda.import_zero_copy(self.flat_p)]
            self.jg = [_cuda.import_zero_copy(self.flat_g)]
        else:
            _cuda.wait_for_torch(self.flat_g.device)

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
        p = self.params[i]
        return dlpack.from_real(host_cache[id(leaf)][off:off + n].view(dlpack.jax_shape(p)).clone(), p)

    def _fill_field(self, sub, key, presence, torch_states):
        leaf = sub[0]
        kind = self._classify(leaf)
        n = len(self.params)
        if kind == "element":
            out = dlpack.to_torch(leaf).clone()
            for i, st in enumerate(torch_states):
                if st and key in st:
                    value = _element_state(st[key], i, self.params[i], key)
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
        ``torch._foreach_copy_``. A copied tensor that is still ``p.grad`` at the next step (it survived:
        ``zero_grad(set_to_none=False)``, micro-batch accumulation across steps) is then moved onto its
        segment (:meth:`_alias`), so that from then on accumulation lands in the buffer directly. Aliasing
        only the survivors matters in torch's default loop, where ``zero_grad()`` drops every ``.grad`` and
        moving each one onto its segment would be work thrown away (1.1 ms a step on 400 tensors,
        ``python -m benchmarks.bridge_loop --profile``). A None grad keeps its segment at zero (ELRA reads
        the whole buffer).
        """
        if self.sparse_seen.any():
            self.check_sparse(opt)
        dsts, srcs, survivors, where, rebuild = [], [], [], [], False
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.data_ptr() != self.ptrs[i]:
                    if p.shape != self.pviews[i].shape or p.dtype != self.pviews[i].dtype or p.device != self.flat_p.device:
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
                            last = self.copied[i]
                            if last is not None and last() is g:  # copied at the last step too: alias it
                                survivors.append(g)
                                where.append((gv, i))
                                self.copied[i] = None
                            else:
                                self.copied[i] = weakref.ref(g)
                    self.filled[i] = True
            if dsts:
                torch._foreach_copy_(dsts, srcs)
                if survivors:
                    self._alias(survivors, where)
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
        if self._cuda_order is not None:  # before build_state too: the init reads the parameters
            self._order_after_torch()
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
        if self._cuda_order == "sync":  # host-synchronous order: torch sees the outputs only when done
            _cuda.wait_for_jax((new_p, self.state))
        # waits for the step (CPU: the host; CUDA: torch's current stream); XLA is then done reading torch memory
        view = dlpack.to_torch(new_p[0])
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
        self._cuda_order = None  # set with the device at the first step (CUDA: "sync" or "dlpack", see _cuda)
        self._zeros = {}
        if len(params) >= SIMPLE_PATH_WARN_LEAVES:
            warnings.warn(
                f"torch_bridge: {len(params)} parameters on the simple (per-tensor) path; compile time grows "
                "linearly with the number of tensors. Use contiguous, non-aliased parameters for the flat path.",
                stacklevel=4,
            )

    def jax_params(self):
        return [dlpack.to_jax(p, complex_as_real=True) for p in self.params]

    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(self.state))

    def _value_to_torch(self, opt, key, sub, i, host_cache):
        leaf, p = sub[i], self.params[i]
        scalar = leaf.ndim == 0 and (p.dim() != 0 or opt._is_scalar_key(key)
                                     or not jnp.issubdtype(leaf.dtype, jnp.floating))
        if scalar:
            return opt._state_value_to_torch(key, np.asarray(leaf), p)
        out = dlpack.to_torch(leaf).clone()
        return dlpack.from_real(out, p) if tuple(leaf.shape) == dlpack.jax_shape(p) else out

    def _fill_field(self, sub, key, presence, torch_states):
        out = []
        for i, (leaf, st) in enumerate(zip(sub, torch_states)):
            p = self.params[i]
            if tuple(leaf.shape) == dlpack.jax_shape(p) and not (leaf.ndim == 0 and presence):
                if st and key in st:
                    value = _element_state(st[key], i, p, key)
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
            self.device = dlpack.to_jax(self.params[0], complex_as_real=True).devices().pop()
            if self.params[0].device.type == "cuda":
                self._cuda_order = _cuda.order_mode(self.device)
        # CUDA, "sync" order (the default): block the host; "dlpack": the per-step imports below order it (_cuda)
        if self._cuda_order == "sync":
            _cuda.wait_for_torch(self.params[0].device)
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
                grads_j.append(dlpack.to_jax(p.grad, complex_as_real=True))
            else:
                key = (tuple(p.shape), p.dtype)
                if key not in self._zeros:
                    self._zeros[key] = jax.device_put(jnp.zeros(dlpack.jax_shape(p), params_j[len(grads_j)].dtype),
                                                      self.device)
                grads_j.append(self._zeros[key])
        mask = [np.bool_(m) for m in mask_host]
        self._export_cache = None
        new_p, self.state = _compiled_step(None, self.state, params_j, grads_j, hyper, mask, value, flag, spec=spec)
        if self._cuda_order == "sync":
            _cuda.wait_for_jax((new_p, self.state))
        with torch.no_grad():
            for p, new, has in zip(self.params, new_p, mask_host):
                if has:  # a complex parameter: the new real view as complex values
                    p.copy_(dlpack.from_real(dlpack.to_torch(new), p))
        self.stepped |= self.marks
        self.stale_idx |= self.marks


class _NeedsSegmentMode(Exception):
    pass


class _NeedsRebuild(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# sparse gradients, and which parameters may live in a flat buffer
# --------------------------------------------------------------------------------------------------


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
