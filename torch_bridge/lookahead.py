"""``Lookahead(optimizer, k=5, alpha=0.5)``: slow weights around a bridge or an ordinary torch optimizer.

Every ``k`` steps of the inner optimizer the fast weights θ (the model's parameters) are pulled towards
the slow weights φ: ``θ ← φ + α(θ − φ)``, then ``φ ← θ`` (α weights the fast weights; Zhang et al. 2019,
arXiv:1907.08610).

* Wrapping a bridge optimizer (``torch_bridge.SGD``, ``Adam``...) takes over its param groups and runs
  :func:`jaxopt_suite.lookahead` around the inner transformation in the same compiled step. The inner
  optimizer object must not be stepped afterwards.
* Wrapping any other ``torch.optim.Optimizer`` runs the same rule in plain torch after its ``step``.

state_dict: torch format, the inner optimizer's per-parameter keys plus ``slow_param``; group keys
``lookahead_step`` (steps since the last synchronisation), ``k`` and ``alpha``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
import torch

import jaxopt_suite
from jaxopt_suite import registry
from jaxopt_suite.nonfinite import check_nonfinite

from . import _validate as V
from .optimizer import JaxOptimizer, entry_info

RESETS = ("none", "inner", "momentum")


def _check(k, alpha, reset):
    """Lookahead's arguments: ``k`` an int >= 1, ``alpha`` in (0, 1] (0 would pull the fast weights back to
    the slow ones at every sync, so nothing ever trains; the JAX factory rejects it too), ``reset`` a mode."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, (bool, np.bool_)) or k < 1:
        raise ValueError(f"Invalid k value: {k!r}; expected an int >= 1")
    V.check_number("alpha", alpha)
    if isinstance(alpha, (bool, np.bool_)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"Invalid alpha value: {alpha}; allowed range is (0, 1] (alpha weights the fast "
                         "weights at a sync: 0 would never train)")
    if reset not in RESETS:
        raise ValueError(f"Invalid reset value: {reset!r}; expected one of {list(RESETS)}")


@dataclasses.dataclass(frozen=True)
class LookaheadFactory:
    """Hashable factory ``lookahead(inner(**kwargs), sync_period, slow_step_size, reset=reset)``."""

    inner: Any  # registry name or factory callable

    @property
    def requires_value(self) -> bool:
        return entry_info(self.inner)[0]

    @property
    def supports_segments(self) -> bool:
        return entry_info(self.inner)[1]

    def __call__(self, *, sync_period, slow_step_size, reset="none", **inner_kwargs):
        build = registry.get(self.inner).build if isinstance(self.inner, str) else self.inner
        return jaxopt_suite.lookahead(build(**inner_kwargs), sync_period, slow_step_size, reset=reset)


class Lookahead(JaxOptimizer):
    """Lookahead around ``optimizer`` (see the module docstring). ``reset``: "none", "inner" or "momentum"."""

    def __new__(cls, optimizer=None, *args, **kwargs):
        if optimizer is not None:  # None: unpickling (cls.__new__(cls))
            _check_optimizer(optimizer)
        if optimizer is not None and not isinstance(optimizer, JaxOptimizer):
            return TorchLookahead(optimizer, *args, **kwargs)
        return super().__new__(cls)

    _persistent_attrs = ("optimizer", "reset", "state_keys", "presence_fields", "group_state_keys",
                         "elementwise", "group_flag_defaults")

    def __init__(self, optimizer, k=5, alpha=0.5, *, reset="none", nonfinite=None):
        _check_optimizer(optimizer)
        _check(k, alpha, reset)
        inner = optimizer
        inner._refresh_state()
        inherited = {p: st for p, st in dict.items(inner.state)}
        for rt in inner._runtime:
            for buf in rt.buffers:
                buf.release()
        inner._runtime = []
        inner._runtime_valid = False
        self.optimizer = inner
        self.reset = reset
        self.state_keys = {**inner.state_keys, "slow_param": "LookaheadState.slow"}
        self.presence_fields = tuple(inner.presence_fields)
        self.group_state_keys = {"lookahead_step": "LookaheadState.count"}
        self.elementwise = inner.elementwise
        self.group_flag_defaults = {**inner.group_flag_defaults, "lookahead_step": 0}
        if nonfinite is None:  # the inner optimizer's policy (it then covers the whole Lookahead step)
            nonfinite = inner.defaults.get("nonfinite", "propagate")
        else:
            check_nonfinite(nonfinite)
            for group in inner.param_groups:
                group["nonfinite"] = nonfinite
        for group in inner.param_groups:
            group.setdefault("k", k)
            group.setdefault("alpha", alpha)
            group.setdefault("lookahead_step", 0)
        defaults = {**inner.defaults, "k": k, "alpha": alpha, "lookahead_step": 0}
        super().__init__(list(inner.param_groups), inner._entry_name, defaults=defaults, flat=inner.flat,
                         write_back=getattr(inner, "write_back", "copy"), nonfinite=nonfinite)
        for p, st in inherited.items():
            if st and "slow_param" not in st:
                # the slow weights start at the current params (what the first step's init would give), so
                # that a state_dict taken before that step is complete
                st = {**st, "slow_param": p.detach().clone()}
            dict.__setitem__(self.state, p, st)
        self._runtime_valid = False  # re-adopt with the inherited state at the first step

    def _group_kinds(self):
        kinds, optional = self.optimizer._group_kinds()
        return {**kinds, "k": 5, "alpha": 0.5, "lookahead_step": 0}, optional

    def _check_group(self, group):
        _check(group["k"], group["alpha"], self.reset)  # before int(k) could truncate a k of 2.5
        super()._check_group(group)

    def _entry_for_group(self, group):
        return LookaheadFactory(self.optimizer._entry_for_group(group))

    def _hyperparams(self, group):
        return {**self.optimizer._hyperparams(group), "sync_period": int(group["k"]),
                "slow_step_size": float(group["alpha"])}

    def _static_config(self, group):
        return {**self.optimizer._static_config(group), "reset": self.reset}

    def step(self, closure=None, *, value=None):
        return super().step(closure, value=value)


#: per-parameter state keys of the torch.optim classes TorchLookahead knows: (always, optional-by-config, torch
#: reads the key's absence as "not started")
_TORCH_KEYS = {
    torch.optim.SGD: (lambda g: {"momentum_buffer"} if g.get("momentum", 0) else set(), {"momentum_buffer"}),
    torch.optim.Adam: (lambda g: {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if g.get("amsgrad") else set()),
                       set()),
    torch.optim.AdamW: (lambda g: {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if g.get("amsgrad") else set()),
                        set()),
}


def _check_torch_lookahead_state(opt, state_dict):
    """Validate a state dict for :class:`TorchLookahead` (returns it with integer state cast to the
    parameter's dtype, as torch.optim casts it). ``ValueError`` for: groups without Lookahead's or the inner
    optimizer's options (another optimizer's state dict), a missing ``slow_param``, an unknown or missing key
    of the inner optimizer (SGD, Adam, AdamW; others are left to their own ``load_state_dict``), a value
    that is not a tensor, of the wrong shape, or complex for a real parameter. ``UserWarning`` for a missing
    key torch reads as "not started" (SGD's ``momentum_buffer``)."""
    import warnings
    where = f"{type(opt).__name__}.load_state_dict"
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups'")
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"{where}: loaded state dict has a different number of parameter groups "
                         f"({len(groups)}) than the optimizer ({len(opt.param_groups)})")
    keys = _TORCH_KEYS.get(type(opt.optimizer))
    new_state = {}
    for gi, (g, cur) in enumerate(zip(groups, opt.param_groups)):
        missing = sorted(k for k in cur if k != "params" and k not in g)
        if missing:
            raise ValueError(f"{where}: param group {gi} of the state dict has no {missing}, which "
                             f"{type(opt).__name__}'s param groups have: the state dict was saved by another optimizer")
        if len(g["params"]) != len(cur["params"]):
            raise ValueError(f"{where}: param group {gi} has {len(g['params'])} parameters, the optimizer's "
                             f"{len(cur['params'])}")
        for j, (pid, p) in enumerate(zip(g["params"], cur["params"])):
            st = state_dict["state"].get(pid)
            if st is None:
                continue
            label = f"parameter {j} of param group {gi} (shape {tuple(p.shape)})"
            if not isinstance(st, dict):
                raise ValueError(f"{where}: the state of {label} is a {type(st).__name__}, expected a dict")
            st = dict(st)
            if st and "slow_param" not in st:
                raise ValueError(f"{where}: {label}: state 'slow_param' is missing (the state has {sorted(st)})")
            if keys is not None:
                want, optional = keys[0](g) | {"slow_param"}, keys[1]
                for k in sorted(want - set(st)):
                    if k in optional:
                        warnings.warn(f"{where}: {label} has no state {k!r}; torch.optim reads it as not started "
                                      "(a fresh buffer at the next step)", UserWarning, stacklevel=3)
                    else:
                        raise ValueError(f"{where}: {label}: state {k!r} is missing (the state has {sorted(st)})")
                for k in sorted(set(st) - want):
                    raise ValueError(f"{where}: {label}: unknown state {k!r} (expected {sorted(want)}): the state "
                                     "dict was saved by another optimizer or altered")
            for k, v in st.items():
                if k == "step":
                    continue
                if not torch.is_tensor(v):
                    raise ValueError(f"{where}: {label}: state {k!r} is a {type(v).__name__}, expected a tensor of "
                                     f"shape {tuple(p.shape)}")
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{where}: {label}: state {k!r} has shape {tuple(v.shape)}, expected "
                                     f"{tuple(p.shape)} (the parameter's shape)")
                if v.is_complex() and not p.is_complex():
                    raise ValueError(f"{where}: {label}: state {k!r} has dtype {v.dtype}, expected {p.dtype} (the "
                                     "parameter is real; casting would drop the imaginary part)")
                if v.dtype == torch.bool:
                    raise ValueError(f"{where}: {label}: state {k!r} has dtype {v.dtype}, expected {p.dtype}")
                # torch.optim's cast (integer state included); a copy: the optimizer never aliases the
                # caller's state dict (its tensors are updated in place by the next steps)
                st[k] = (v.to(dtype=p.dtype) if p.is_floating_point() else v).clone()
            new_state[pid] = st
    out = dict(state_dict)
    out["state"] = {**state_dict["state"], **new_state}
    return out


def _check_optimizer(optimizer) -> None:
    """The wrapped optimizer must be a ``torch.optim.Optimizer`` (a bridge one or an ordinary one)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Lookahead's optimizer must be a torch.optim.Optimizer instance (a torch_bridge or a "
                        f"torch.optim optimizer), got {optimizer!r} ({type(optimizer).__name__})")


class TorchLookahead(torch.optim.Optimizer):
    """Lookahead around an ordinary ``torch.optim`` optimizer, in plain torch (same rule and state keys)."""

    def __init__(self, optimizer: torch.optim.Optimizer, k=5, alpha=0.5, *, reset="none"):
        _check_optimizer(optimizer)
        _check(k, alpha, reset)
        if reset != "none":
            raise ValueError("reset modes other than 'none' need a torch_bridge inner optimizer")
        for group in optimizer.param_groups:
            group.setdefault("k", k)
            group.setdefault("alpha", alpha)
            group.setdefault("lookahead_step", 0)
        torch.optim.Optimizer.__setstate__(self, {
            "optimizer": optimizer, "param_groups": optimizer.param_groups,
            "defaults": {**optimizer.defaults, "k": k, "alpha": alpha, "lookahead_step": 0},
            "state": collections.defaultdict(dict), "reset": reset,
        })
        self._optimizer_step_pre_hooks = collections.OrderedDict()
        self._optimizer_step_post_hooks = collections.OrderedDict()

    def __getstate__(self):
        return {"optimizer": self.optimizer, "param_groups": self.param_groups, "defaults": self.defaults,
                "state": self.state, "reset": self.reset}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if "slow_param" not in self.state[p]:
                    self.state[p]["slow_param"] = p.detach().clone()
        loss = self.optimizer.step(closure)
        for group in self.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] >= group["k"]:
                group["lookahead_step"] = 0
                for p in group["params"]:
                    slow = self.state[p]["slow_param"]
                    slow.add_(p.detach() - slow, alpha=group["alpha"])
                    p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self):
        inner = self.optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for p, st in self.state.items():
            if "slow_param" in st:
                inner["state"].setdefault(index[id(p)], {})["slow_param"] = st["slow_param"].clone()
        return inner

    def load_state_dict(self, state_dict) -> None:
        """torch's format (the inner optimizer's state plus ``slow_param``), checked before anything is
        replaced (:func:`_check_torch_lookahead_state`: ``ValueError`` naming group, parameter and key)."""
        state_dict = _check_torch_lookahead_state(self, state_dict)
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        slow = {k: v.pop("slow_param") for k, v in state.items() if "slow_param" in v}
        self.optimizer.load_state_dict({"state": {k: v for k, v in state.items() if v},
                                        "param_groups": state_dict["param_groups"]})
        self.param_groups = self.optimizer.param_groups
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = collections.defaultdict(dict)
        for k, v in slow.items():
            self.state[params[k]]["slow_param"] = v.to(dtype=params[k].dtype, device=params[k].device).clone()
