"""``EnhancedSGD``: :func:`jaxopt_suite.enhanced_sgd` as a ``torch.optim.Optimizer``, with the reference's signature.

The controller and all gradient statistics are global over every parameter of every group, so unlike the
generic per-group runtime of :class:`~torch_bridge.optimizer.JaxOptimizer` this class keeps **one** JAX state
for all parameters (in ``param_groups`` order) and one compiled step. Each group's ``'lr'`` and
``'momentum'`` are the base values of its own parameters (read at every step as traced arguments, so
schedulers never recompile); every other option is global.

``step(closure)`` calls the closure once under ``enable_grad``; its return value (tensor or Python number)
is the loss that drives the Q-learning controller and the spike handling. ``step(value=loss)`` passes the
loss directly (``GradScaler.step(opt, value=loss)``); ``step()`` runs without a loss (controller skipped).
The loss tensor is handed to JAX without ``.item()``. Parameters whose ``.grad`` is None are skipped
(zero update, their buffers kept) and left out of the statistics.

state_dict: per parameter ``momentum_buffer`` (torch SGD's name), ``retained`` (the retained-gradient
average) and ``slow`` (lookahead's slow weights); the controller under the non-parameter key
``state['controller']`` (tensors; the PRNG key's raw ``uint32`` words held as ``int64``, exactly: torch's
``uint32`` tensors cannot be unpickled, so the optimizer and its state dict pickle and deep-copy; a state
dict holding the key as ``uint32`` loads too). Resuming is bit-identical.

Arguments accepted for compatibility and ignored (they have no effect in the reference either):
``model``, ``decay``, ``usage_case``, ``max_steps``, and ``step``'s ``current_epoch``.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Hashable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxopt_suite._common import FlatLayout
from jaxopt_suite.enhanced_sgd import transform as T
from jaxopt_suite.lookahead import LookaheadState
from jaxopt_suite.nonfinite import SkipNonFiniteState, check_nonfinite, skip_nonfinite

from . import _validate as V
from . import _cuda, dlpack
from . import optimizer as _optimizer
from ._state_map import _warn_user, edited_keys, hand_out, keep_edits, restore_edits
from .optimizer import (JaxOptimizer, LoadSpec, StateSlot, _LazyState, _host_of_torch, _host_to_torch, jax_shapes,
                        param_labels, raise_if_nonfinite, sparse_gradient_error)

__all__ = ["EnhancedSGD"]

# numeric options, traced (global); "lr" and "momentum" are per group
_SCALARS = ("smoothing_factor", "noise_scale", "entropy_weight", "loss_correction_factor", "retention_weight",
            "q_learning_rate", "q_discount", "q_epsilon", "q_epsilon_decay", "q_epsilon_min",
            "q_initial_mix_prob", "lookahead_alpha")
# structural options (static)
_STATIC = ("lookahead_k", "apply_noise", "adaptive_momentum", "gradient_centering", "centering_axis",
           "gradient_clipping", "gradient_retention", "gradient_buffer_size", "lr_scale_bounds",
           "momentum_scale_bounds", "max_momentum", "spike_recovery_steps", "entropy_bins", "bayesian_init",
           "bayesian_prior_std", "seed")
_IGNORED = ("decay", "usage_case", "max_steps")
# static options that only ``init`` reads: the compiled update does not depend on them
_INIT_ONLY = ("bayesian_init", "bayesian_prior_std", "seed")
_PER_PARAM_FIELDS = ("momentum_buffer", "retained")
_FACTORY_ARGS = tuple(inspect.signature(T.enhanced_sgd).parameters)


def _transformation(lrs, moms, scalars, static, seed=None, segments=None):
    kwargs = dict(static)
    if seed is not None:
        kwargs["seed"] = seed
    return T.enhanced_sgd(learning_rate=list(lrs), momentum=list(moms), **scalars, segments=segments, **kwargs)


# The seed is a traced argument of the init (it only makes the initial PRNG key): instances that differ in
# their seed (``seed=None`` draws one per instance) share one compiled init and one compiled step.
# ``segments``: the flat layout (params and grads one flat buffer), or None for the per-parameter list.
@functools.partial(jax.jit, static_argnames=("static", "segments"))
def _init(params, lrs, moms, scalars, seed, *, static, segments=None):
    return _transformation(lrs, moms, scalars, static, seed, segments).init(params)


@functools.partial(jax.jit, static_argnames=("static", "skip", "segments"))
def _step(state, params, grads, mask, lrs, moms, scalars, value, skips=None, *, static, skip=False, segments=None):
    tx = _transformation(lrs, moms, scalars, static, segments=segments)
    if skip:  # nonfinite="skip": the suite's wrapper around the whole step (lookahead included)
        tx, state = skip_nonfinite(tx, segments=segments, check_value=True), SkipNonFiniteState(skips, state)
    extra = {} if value is None else {"value": value}
    if mask is not None:
        extra["grad_mask"] = mask
    updates, state = tx.update(grads, state, params, **extra)
    if skip:
        skips, state = state.skips, state.inner_state
    new_params = [(p + u).astype(p.dtype) for p, u in zip(params, updates)]
    return new_params, state, skips


_optimizer._STEP_FUNCTIONS.append(_step)
_optimizer._INIT_FUNCTIONS.append(_init)


class _FlatPack:
    """The flat path's torch buffers: every parameter (one dtype and device) a segment of ``flat_p``, every
    gradient a segment of ``flat_g`` (:class:`~jaxopt_suite.FlatLayout`, 64-byte aligned). The parameters
    stay the user's tensors: each step copies them and their gradients in (one ``torch._foreach_copy_``
    each), imports the two buffers by DLPack (two imports whatever the number of tensors) and copies the
    new values back out (one more ``_foreach_copy_``)."""

    def __init__(self, params):
        dtype, device = params[0].dtype, params[0].device
        self.key = _pack_key(params)
        self.layout = FlatLayout.from_shapes([tuple(p.shape) for p in params], dlpack.align_elements(dtype))
        self.flat_p = torch.zeros(self.layout.total, dtype=dtype, device=device)
        self.flat_g = torch.zeros(self.layout.total, dtype=dtype, device=device)
        self.pviews = self.views(self.flat_p, params)
        self.gviews = self.views(self.flat_g, params)

    def views(self, flat: torch.Tensor, params) -> list:
        """Segment views of a flat tensor of this layout, shaped like ``params``."""
        return [flat[off:off + n].view(p.shape) for off, n, p in zip(self.layout.offsets, self.layout.numels, params)]

    def load(self, params, has_grad):
        """Copy the parameters and gradients in (a missing gradient's segment is zeroed, and masked)."""
        torch._foreach_copy_(self.pviews, [p.detach() for p in params])
        with_grad = [i for i, h in enumerate(has_grad) if h]
        if with_grad:
            torch._foreach_copy_([self.gviews[i] for i in with_grad], [params[i].grad.detach() for i in with_grad])
        missing = [self.gviews[i] for i, h in enumerate(has_grad) if not h]
        if missing:
            torch._foreach_zero_(missing)
        return dlpack.to_jax(self.flat_p), dlpack.to_jax(self.flat_g)

    def flatten(self, tensors) -> torch.Tensor:
        """Per-parameter torch tensors as one flat tensor of this layout (zero padding)."""
        out = torch.zeros_like(self.flat_p)
        torch._foreach_copy_(self.views(out, tensors), list(tensors))
        return out


def _pack_key(params) -> tuple:
    return tuple((id(p), tuple(p.shape), p.dtype, p.device) for p in params)


def _flat_eligible(params) -> bool:
    """One dtype and one device: the step runs on one flat buffer (the statistics are global anyway)."""
    return bool(params) and len({(p.dtype, p.device) for p in params}) == 1


def _per_param_to_flat(state, layout):
    """A list-layout state (per-parameter leaves in ``momentum_buffer``, ``retained``, lookahead's ``slow``)
    in the flat layout: each such list becomes one zero-padded flat buffer."""

    def flat(leaves):
        if leaves is None:
            return None
        parts = []
        for x, num, padded in zip(leaves, layout.numels, layout.padded):
            parts += [jnp.ravel(x), jnp.zeros((padded - num,), x.dtype)]
        return [jnp.concatenate(parts)]

    def inner(s: T.EnhancedSGDState):
        return s._replace(momentum_buffer=flat(s.momentum_buffer), retained=flat(s.retained))

    if isinstance(state, LookaheadState):
        return state._replace(slow=flat(state.slow), inner_state=inner(state.inner_state))
    return inner(state)


def _flat_to_per_param(state, layout):
    """The inverse of :func:`_per_param_to_flat` (slices of the flat buffers, reshaped)."""

    def split(leaves):
        if leaves is None:
            return None
        flat = leaves[0]
        return [flat[off:off + n].reshape(shape)
                for off, n, shape in zip(layout.offsets, layout.numels, layout.shapes)]

    def inner(s: T.EnhancedSGDState):
        return s._replace(momentum_buffer=split(s.momentum_buffer), retained=split(s.retained))

    if isinstance(state, LookaheadState):
        return state._replace(slow=split(state.slow), inner_state=inner(state.inner_state))
    return inner(state)


def _controller_to_torch(leaf) -> torch.Tensor:
    """A controller leaf as a torch tensor of the same values; the PRNG key's ``uint32`` words as ``int64``
    (exact; torch's ``uint32`` tensors cannot be unpickled), see :func:`~torch_bridge._state_map._host_to_torch`."""
    return _host_to_torch(leaf)


def _controller_to_jax(value, ref) -> jax.Array:
    """A torch-side controller value as the JAX leaf ``ref`` (its dtype and shape), cast exactly."""
    return jnp.asarray(_host_of_torch(value, ref.dtype), ref.dtype).reshape(ref.shape)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


class _ControllerView:
    """Read-only view of the Q-learning controller (``opt.q_controller``), plus ``update_mix_prob``."""

    def __init__(self, owner: "EnhancedSGD"):
        self._owner = owner

    def _state(self) -> T.EnhancedSGDState:
        return T.find_enhanced_state(self._owner._ensure_state())

    def _read(self, name):
        return dlpack.to_torch(getattr(self._state(), name)).clone()

    epsilon = property(lambda self: self._read("epsilon"))
    mix_prob = property(lambda self: self._read("mix_prob"))
    q_table = property(lambda self: self._read("q_table"))
    lr_scale = property(lambda self: self._read("lr_scale"))
    momentum_scale = property(lambda self: self._read("momentum_scale"))

    def update_mix_prob(self, current_loss, epoch=None, decay_factor: float = 0.98, loss_threshold: float = 0.01):
        """The reference's rule (see :func:`jaxopt_suite.enhanced_sgd.update_mix_prob`); ``epoch`` is ignored."""
        del epoch
        owner = self._owner
        loss = owner._loss_to_jax(current_loss)
        owner._jstate = T.update_mix_prob(owner._ensure_state(), loss, decay_factor=decay_factor,
                                          loss_threshold=loss_threshold)
        owner._stale = True


class EnhancedSGD(JaxOptimizer):
    """EnhancedSGD (see :func:`jaxopt_suite.enhanced_sgd` for the update rule), reference signature.

    Positional arguments follow the reference implementation's order and defaults; options it did not have
    are keyword-only. ``layer_type_scaling`` and ``grad_cam_scaling`` were never implemented there and raise
    ``NotImplementedError``. ``seed=None`` draws the seed once from torch's global generator. The seed, ``lr``,
    ``momentum`` and the numeric options of ``_SCALARS`` (``smoothing_factor``, ``noise_scale``, the ``q_*``
    rates, ``lookahead_alpha``...) are data, not compile-time constants: instances that differ only in them
    share one compiled init and one compiled step. The structural options (``lookahead_k``, the flags,
    ``gradient_buffer_size``, ``max_momentum``, the scale bounds, ``spike_recovery_steps``, ``entropy_bins``,
    ``bayesian_prior_std``: static in the factory) compile once per value.

    ``nonfinite`` (keyword-only, global): ``"propagate"`` (default) is EnhancedSGD's own handling (the inner
    step is skipped, Lookahead still counts it). ``"skip"``: :func:`jaxopt_suite.skip_nonfinite` around the
    whole step, so a non-finite gradient or loss leaves parameters and state (controller, PRNG key, Lookahead)
    bit-identical and adds 1 to the group key ``nonfinite_skips``. ``"raise"``: ``FloatingPointError`` naming
    the loss or the parameter before anything is modified.
    """

    entry_name = "enhanced_sgd"

    def __init__(self, params, model=None, lr=0.01, momentum=0.9, smoothing_factor=0.1, decay=0.99,
                 usage_case="LLM", max_steps=100000, lookahead_k=5, lookahead_alpha=0.5, apply_noise=True,
                 adaptive_momentum=True, layer_type_scaling=None, grad_cam_scaling=False, gradient_centering=True,
                 noise_scale=1e-4, gradient_clipping=True, entropy_weight=0.1, gradient_buffer_size=100,
                 loss_correction_factor=0.5, *, retention_weight=0.1, gradient_retention=True,
                 q_learning_rate=0.1, q_discount=0.9, q_epsilon=0.5, q_epsilon_decay=0.995, q_epsilon_min=0.01,
                 q_initial_mix_prob=0.8, lr_scale_bounds=(0.5, 1.5), momentum_scale_bounds=(0.9, 1.1),
                 max_momentum=0.99, spike_recovery_steps=10, entropy_bins=100, centering_axis=0,
                 bayesian_init=False, bayesian_prior_std=0.05, seed=None, nonfinite="propagate", flat=True):
        del model  # accepted for compatibility; unused (as in the reference)
        if layer_type_scaling is not None:
            raise NotImplementedError("layer_type_scaling is not implemented (it had no effect in the reference)")
        if not isinstance(grad_cam_scaling, (bool, np.bool_)):
            raise TypeError(f"Invalid grad_cam_scaling: {grad_cam_scaling!r}; expected a Python bool (only False "
                            "is supported).")
        if grad_cam_scaling:
            raise NotImplementedError("grad_cam_scaling is not implemented (it had no effect in the reference)")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        options = dict(
            smoothing_factor=smoothing_factor, noise_scale=noise_scale, entropy_weight=entropy_weight,
            loss_correction_factor=loss_correction_factor, retention_weight=retention_weight,
            q_learning_rate=q_learning_rate, q_discount=q_discount, q_epsilon=q_epsilon,
            q_epsilon_decay=q_epsilon_decay, q_epsilon_min=q_epsilon_min, q_initial_mix_prob=q_initial_mix_prob,
            lookahead_alpha=lookahead_alpha, lookahead_k=lookahead_k, apply_noise=apply_noise,
            adaptive_momentum=adaptive_momentum, gradient_centering=gradient_centering,
            centering_axis=centering_axis, gradient_clipping=gradient_clipping,
            gradient_retention=gradient_retention, gradient_buffer_size=gradient_buffer_size,
            lr_scale_bounds=T._check_bounds("lr_scale_bounds", lr_scale_bounds),
            momentum_scale_bounds=T._check_bounds("momentum_scale_bounds", momentum_scale_bounds),
            max_momentum=max_momentum, spike_recovery_steps=spike_recovery_steps, entropy_bins=entropy_bins,
            bayesian_init=bayesian_init, bayesian_prior_std=bayesian_prior_std, seed=seed,
        )
        # validation (ValueError naming the argument) by building the transformation once
        T.enhanced_sgd(learning_rate=lr, momentum=momentum, **options)
        defaults = dict(lr=lr, momentum=momentum, decay=decay, usage_case=usage_case, max_steps=max_steps,
                        **options)
        self._jstate = None
        self._jlayout = None  # the FlatLayout _jstate is in (flat path), None for the per-parameter list
        self._pack = None  # the flat path's torch buffers (_FlatPack)
        self._skips = None  # nonfinite="skip" counter (device int32)
        self._stale = False
        self._handed = {}  # what the last _export put in self.state: key -> (entry, {name: (value, _version)})
        JaxOptimizer.__init__(self, params, defaults=defaults, nonfinite=nonfinite, flat=flat)
        self._check_groups()

    # ---- groups -------------------------------------------------------------------------------
    def _check_groups(self):
        for i, group in enumerate(self.param_groups):
            # complex parameters raise (ValueError naming the parameter): the controller reads norms and
            # statistics over whole tensors, not an elementwise rule (docs/bridge.md, "Complex parameters")
            self._check_complex(list(group["params"]), param_labels(self.param_groups, group["params"]))
            for key in _SCALARS + _STATIC:
                if _hashable(group.get(key)) != _hashable(self.defaults[key]):
                    raise ValueError(f"EnhancedSGD: option {key!r} is global; param group {i} overrides it "
                                     f"({group.get(key)!r} != {self.defaults[key]!r}). Only 'lr' and "
                                     "'momentum' may differ per group.")
            V.check_strict("lr", group["lr"], "Invalid learning rate")
            V.check_strict("momentum", group["momentum"], "Invalid momentum value")
            if not float(group["lr"]) > 0:
                raise ValueError(f"Invalid learning rate: {group['lr']} (param group {i})")
            if not 0 <= float(group["momentum"]) < 1:
                raise ValueError(f"Invalid momentum value: {group['momentum']} (param group {i})")

    def add_param_group(self, param_group: dict) -> None:
        torch.optim.Optimizer.add_param_group(self, param_group)
        try:
            self._check_groups()
        except BaseException:
            self.param_groups.pop()  # a group that fails its checks is not added (as JaxOptimizer's)
            raise
        if getattr(self, "_jstate", None) is not None:
            self._export()
            self._jstate = None  # rebuilt (with the new parameters) from the torch-side state
        self._pack = None

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _static(self, *, for_update: bool = False, for_init: bool = False) -> tuple:
        """Static options as given; for a compiled function, the options it does not read are fixed (the
        update reads no init-only option, the init gets the seed as a traced argument, :meth:`_seed`), so
        that instances differing in them share it."""
        defaults = {"bayesian_init": False, "bayesian_prior_std": 0.05, "seed": 0}
        fixed = _INIT_ONLY if for_update else ("seed",) if for_init else ()
        return tuple((k, defaults[k] if k in fixed else _hashable(self.defaults[k])) for k in _STATIC)

    def _seed(self):
        """The seed as the init's traced argument: the array ``jax.random.PRNGKey`` makes of a Python int."""
        return jnp.asarray(np.int64(int(self.defaults["seed"])))

    def _init_call(self):
        """``(init, traced)``: the compiled init with its static options bound (the seed fixed) and its traced
        arguments ``(lrs, moms, scalars, seed)``. :meth:`_build_state` calls it; :meth:`_load_spec` traces
        the same call with ``jax.eval_shape``, so that what ``load_state_dict`` expects is what the next step
        builds."""
        return functools.partial(_init, static=self._static(for_init=True)), (*self._traced(), self._seed())

    def _traced(self):
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 with x64 (like Python floats)
        lrs, moms = [], []
        for g in self.param_groups:
            lrs += [jnp.asarray(float(g["lr"]), dtype)] * len(g["params"])
            moms += [jnp.asarray(float(g["momentum"]), dtype)] * len(g["params"])
        scalars = {k: jnp.asarray(float(self.defaults[k]), dtype) for k in _SCALARS}
        return lrs, moms, scalars

    def _loss_to_jax(self, loss):
        if torch.is_tensor(loss):
            t = loss.detach()
            if t.dtype not in (torch.float32, torch.float64):
                t = t.float()
            if t.dtype == torch.float64 and not dlpack.x64_enabled():
                t = t.float()
            return dlpack.to_jax(t.reshape(()).contiguous())
        return jnp.asarray(float(loss), jnp.float32)

    # ---- JAX state <-> torch state ------------------------------------------------------------
    def _flat_pack(self) -> Optional[_FlatPack]:
        """The flat path's buffers for the current parameters, or None (``flat=False``, several dtypes or
        devices: the per-parameter list path)."""
        params = self._params()
        if not (self.flat and _flat_eligible(params)):
            return None
        if self._pack is None or self._pack.key != _pack_key(params):
            self._pack = _FlatPack(params)
        return self._pack

    def _ensure_state(self):
        pack = self._flat_pack()
        layout = None if pack is None else pack.layout
        if self._jstate is not None and self._jlayout != layout:  # parameters changed layout: via torch
            self._export()
            self._jstate = None
        if self._jstate is None:
            self._jstate = self._build_state(layout)
            self._jlayout = layout
            self._handed = {}  # the torch side was just read in: what it holds is the JAX state's point
            self._skips = jnp.asarray(int(self.param_groups[0].get("nonfinite_skips", 0)), jnp.int32)
        return self._jstate

    def _nonfinite_policy(self) -> str:
        """The constructor's ``nonfinite`` (global, as every option but 'lr' and 'momentum')."""
        policies = {check_nonfinite(g.get("nonfinite", "propagate")) for g in self.param_groups}
        if len(policies) > 1:
            raise ValueError(f"EnhancedSGD: option 'nonfinite' is global; the param groups use {sorted(policies)}")
        return policies.pop()

    def _build_state(self, layout: Optional[FlatLayout] = None):
        """The JAX state from the torch-side state: over the parameter list, or in the flat ``layout``."""
        params = self._params()
        torch_state = [dict.get(self.state, p) or {} for p in params]
        controller = dict.get(self.state, "controller")
        init, traced = self._init_call()
        if layout is not None:
            if not any(torch_state) and not controller:  # a fresh state: the flat init (one leaf per field)
                flat_p = self._flat_pack().flatten([p.detach() for p in params])
                return functools.partial(init, segments=layout)([dlpack.to_jax_copy(flat_p)], *traced)
            return _per_param_to_flat(self._build_state(None), layout)
        params_j = [dlpack.to_jax_copy(p.detach()) for p in params]
        state = init(params_j, *traced)
        if not any(torch_state) and not controller:
            return state

        def per_param(tree, key):
            out = []
            for leaf, st, p in zip(tree, torch_state, params):
                if key in st:
                    out.append(dlpack.to_jax_copy(st[key].detach().to(p.device).contiguous(), leaf.dtype))
                else:
                    out.append(leaf)
            return out

        def fix_inner(s: T.EnhancedSGDState):
            fields = {"momentum_buffer": per_param(s.momentum_buffer, "momentum_buffer")}
            if s.retained is not None:
                fields["retained"] = per_param(s.retained, "retained")
            for name in s._fields:
                if name in _PER_PARAM_FIELDS or not controller or name not in controller:
                    continue
                ref = getattr(s, name)
                fields[name] = _controller_to_jax(controller[name], ref)
            return s._replace(**fields)

        if isinstance(state, LookaheadState):
            count = state.count
            if controller and "lookahead_count" in controller:
                count = _controller_to_jax(controller["lookahead_count"], count)
            return state._replace(count=count, slow=per_param(state.slow, "slow"),
                                  inner_state=fix_inner(state.inner_state))
        return fix_inner(state)

    def _export(self):
        """Write torch-format snapshots of the JAX state into ``self.state``."""
        self._stale = False
        if self._jstate is None:
            return
        state = self._jstate
        if self._jlayout is not None:
            state = _flat_to_per_param(state, self._jlayout)
        inner = T.find_enhanced_state(state)
        per_param = {"momentum_buffer": inner.momentum_buffer}
        if inner.retained is not None:
            per_param["retained"] = inner.retained
        controller = {}
        if isinstance(state, LookaheadState):
            per_param["slow"] = state.slow
            controller["lookahead_count"] = _controller_to_torch(state.count)
        for i, p in enumerate(self._params()):
            dict.__setitem__(self.state, p, {k: dlpack.to_torch(v[i]).clone() for k, v in per_param.items()})
        for name in inner._fields:
            if name in _PER_PARAM_FIELDS:
                continue
            controller[name] = _controller_to_torch(getattr(inner, name))
        dict.__setitem__(self.state, "controller", controller)
        self._handed = hand_out(self.state)
        if self._skips is not None and self._nonfinite_policy() == "skip":
            for group in self.param_groups:
                group["nonfinite_skips"] = int(self._skips)

    def _refresh_state(self):
        if getattr(self, "_stale", False):
            self._export()

    def _absorb_torch_edits(self) -> None:
        """Edits of ``optimizer.state`` take effect at the next step, as in torch.optim: the edited entries
        are kept, the others brought up to date, and the JAX state is rebuilt from the torch-side state (the
        path ``load_state_dict`` takes; the rebuilt state is exact, so an unedited run would not change)."""
        if self._jstate is None or not self._handed:
            return
        edited = edited_keys(self.state, self._handed)
        if not edited:
            return
        if self._stale:  # the JAX state moved on since those snapshots were handed out
            _warn_user("EnhancedSGD: optimizer.state was edited on a snapshot read before the last step(); the "
                       "edited values are used as they are (read optimizer.state[p] after step() to edit the "
                       "current state)")
            kept = keep_edits(self.state, self._handed, edited)
            self._export()  # every other value up to date
            restore_edits(self.state, kept)
        self._jstate = None  # rebuilt from self.state by _ensure_state
        self._handed = {}

    # ---- torch.optim API ----------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        torch.optim.Optimizer.zero_grad(self, set_to_none)

    def step(self, closure=None, current_epoch=1, *, value=None):
        """One step. ``closure`` returns the loss; ``value=`` passes it directly; ``current_epoch`` is ignored."""
        del current_epoch
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if value is None:
            value = loss
        params = self._params()
        has_grad = [p.grad is not None for p in params]
        sparse = next((p for p, h in zip(params, has_grad) if h and p.grad.layout != torch.strided), None)
        if sparse is not None:
            raise sparse_gradient_error("EnhancedSGD", param_labels(self.param_groups, [sparse])[0], sparse.grad.layout)
        if not any(has_grad):
            return loss
        with torch.no_grad():
            policy = self._nonfinite_policy()
            if policy == "raise":
                raise_if_nonfinite("EnhancedSGD.step", self.param_groups, value=value)
            # CUDA, "sync" order (the default): block the host; "dlpack": the per-step imports below order it (_cuda)
            host_sync = _cuda.order_for(params[0]) == "sync"
            if host_sync:
                _cuda.wait_for_torch(params[0].device)
            self._absorb_torch_edits()
            state = self._ensure_state()
            if self._jlayout is not None:
                self._flat_step(state, params, has_grad, value, policy, host_sync)
                self._stale = True
                return loss
            params_j = [dlpack.to_jax(p) for p in params]
            grads_j = [dlpack.to_jax(p.grad) if h else jnp.zeros(p.shape, params_j[i].dtype)
                       for i, (p, h) in enumerate(zip(params, has_grad))]
            mask = None if all(has_grad) else [np.bool_(h) for h in has_grad]
            lrs, moms, scalars = self._traced()
            v = None if value is None else self._loss_to_jax(value)
            skip = policy == "skip"
            new_params, self._jstate, skips = _step(state, params_j, grads_j, mask, lrs, moms, scalars, v,
                                                    self._skips if skip else None,
                                                    static=self._static(for_update=True), skip=skip)
            if skip:
                self._skips = skips
            if host_sync:
                _cuda.wait_for_jax((new_params, self._jstate))
            for p, new in zip(params, new_params):
                p.copy_(dlpack.to_torch(new))
        self._stale = True
        return loss

    def _flat_step(self, state, params, has_grad, value, policy, host_sync=False):
        """The step on the flat buffers (see :class:`_FlatPack`). On CUDA in the "sync" order the host waits
        for torch's copies into the buffers before the step and for JAX's outputs after it (the "dlpack"
        order: the per-step imports and ``to_torch`` are the handshakes, :mod:`torch_bridge._cuda`)."""
        pack = self._pack
        jp, jg = pack.load(params, has_grad)
        if host_sync:
            _cuda.wait_for_torch(params[0].device)
        mask = None if all(has_grad) else [np.append(np.asarray(has_grad, bool), True)]  # + the padding
        lrs, moms, scalars = self._traced()
        v = None if value is None else self._loss_to_jax(value)
        skip = policy == "skip"
        new_params, self._jstate, skips = _step(state, [jp], [jg], mask, lrs, moms, scalars, v,
                                                self._skips if skip else None,
                                                static=self._static(for_update=True), skip=skip,
                                                segments=pack.layout)
        if skip:
            self._skips = skips
        if host_sync:
            _cuda.wait_for_jax((new_params, self._jstate))
        new = dlpack.to_torch(new_params[0])  # waits for the step: XLA is done reading the torch buffers
        torch._foreach_copy_(params, pack.views(new, params))

    @property
    def q_controller(self) -> _ControllerView:
        return _ControllerView(self)

    def bayesian_initialize_params(self):
        """Redraw the controller's scales around their current values (the optimizer's own key advances)."""
        d = self.defaults
        self._jstate = T.bayesian_initialize(
            self._ensure_state(), None, d["bayesian_prior_std"], lr_scale_bounds=d["lr_scale_bounds"],
            momentum_scale_bounds=d["momentum_scale_bounds"], adaptive_momentum=d["adaptive_momentum"])
        self._stale = True

    # ---- checkpoint conversion (torch_bridge.checkpoint) ---------------------------------------------
    def _checkpoint_export(self):
        """``(tx, state, params, kwargs)``: the JAX state over the parameter list (param_groups order),
        built from the torch-side state as the next step would build it; ``tx`` is the suite's
        ``enhanced_sgd`` with these options (one learning rate and momentum: groups must agree)."""
        lrs = {float(g["lr"]) for g in self.param_groups}
        moms = {float(g["momentum"]) for g in self.param_groups}
        if len(lrs) > 1 or len(moms) > 1:
            raise ValueError("EnhancedSGD: the param groups use different 'lr' / 'momentum'; a checkpoint "
                             "conversion maps onto one enhanced_sgd(learning_rate, momentum)")
        self._refresh_state()
        state = self._build_state()
        kwargs = {"learning_rate": lrs.pop(), "momentum": moms.pop(),
                  **{k: float(self.defaults[k]) for k in _SCALARS if k in _FACTORY_ARGS},
                  **{k: v for k, v in self._static()}}
        from jaxopt_suite import registry

        return registry.get("enhanced_sgd").build(**kwargs), state, self._params(), kwargs

    def _checkpoint_import(self, state) -> None:
        """Make the list-layout ``state`` this optimizer's state (torch side authoritative afterwards)."""
        self._jstate, self._jlayout = state, None
        self._export()
        self._jstate = None

    def state_dict(self):
        self._refresh_state()
        return torch.optim.Optimizer.state_dict(self)

    def _load_spec(self, groups) -> LoadSpec:
        """Per parameter ``momentum_buffer`` (+ ``retained``, ``slow`` when configured); ``state['controller']``
        every other field of the state (shapes and dtypes of a traced ``init``)."""
        params = [p for g in groups for p in g["params"]]
        init, traced = self._init_call()
        template = jax.eval_shape(init, jax_shapes(params), *traced)  # what _build_state builds, abstractly
        inner = T.find_enhanced_state(template)
        keys = ["momentum_buffer"] + (["retained"] if inner.retained is not None else [])
        controller = {}
        if isinstance(template, LookaheadState):
            keys.append("slow")
            controller["lookahead_count"] = StateSlot(tuple(template.count.shape), template.count.dtype)
        for name in inner._fields:
            leaf = getattr(inner, name)
            if name not in _PER_PARAM_FIELDS and leaf is not None:
                controller[name] = StateSlot(tuple(leaf.shape), leaf.dtype)
        per_param = [[{k: StateSlot(tuple(p.shape), p.dtype, True) for k in keys} for p in g["params"]]
                     for g in groups]
        return LoadSpec(per_param, frozenset(("momentum_buffer", "retained", "slow")),
                        globals_={"controller": controller}, globals_required=True, group_slots=[{} for _ in groups])

    def load_state_dict(self, state_dict) -> None:
        JaxOptimizer.load_state_dict(self, state_dict)  # validates (see _load_spec), then torch's load
        controller = dict.get(self.state, "controller")
        if controller:
            dict.__setitem__(self.state, "controller", {k: torch.as_tensor(v).clone() for k, v in controller.items()})
        self._jstate = None
        self._stale = False
        self._handed = {}

    def __getstate__(self):
        self._refresh_state()
        out = torch.optim.Optimizer.__getstate__(self)
        out["flat"] = self.flat
        return out

    def __setstate__(self, state) -> None:
        self._validate_if_loading(state)
        torch.optim.Optimizer.__setstate__(self, state)
        raw = self.state
        self.state = _LazyState(self, dict.items(raw) if isinstance(raw, dict) else raw)
        self.__dict__.setdefault("_jstate", None)
        self.__dict__.setdefault("_jlayout", None)
        self.__dict__["_pack"] = None
        self.__dict__.setdefault("_skips", None)
        self.__dict__["_stale"] = False
        self.__dict__["_handed"] = {}
        self.__dict__.setdefault("_entry_name", self.entry_name)
        self.__dict__.setdefault("flat", True)
        self._init_runtime()
