"""``AutoSGM``: :func:`jaxopt_suite.autosgm` behind the reference implementation's tuple constructor.

The configuration tuples are those of the AutoSGM reference (github.com/somefunAgba/autosgm)::

    lr_cfg   = (aoptlr, lr, num_lrc)                                  # lr_cfg[1] initialises group['lr']
    beta_cfg = (beta_n, beta_a, beta_i, gamma_i, eta_i, debias)
    rc_cfg   = (rcm, inseq, x, n, m, tau, spe, cfact, e)                # window (learning-rate schedule)
    wd_cfg   = (weight_decay, wd_level)
    eps_cfg  = (eps,)

Differences from the reference, on purpose: every param group has a live ``'lr'`` key (torch schedulers
work; it is read at every step), ``step(closure)`` calls the closure, the ``state_dict`` holds tensors only,
numeric entries of a group's tuples may change between steps, ``num_lrc=4`` is the Huberised step
(the reference spells it ``lr_cfg[0] == 4``) and ``mix_cfg[0] = True`` (an undocumented 2-D path) raises
``NotImplementedError``. See :mod:`jaxopt_suite.autosgm.autosgm` for the update rule.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import torch

from jaxopt_suite.autosgm.autosgm import (
    DEFAULT_BETA_CFG,
    DEFAULT_EPS_CFG,
    DEFAULT_LR_CFG,
    DEFAULT_RC_CFG,
    DEFAULT_WD_CFG,
    _scale_by_autosgm,
    config_from_tuples,
    validate_mix_cfg,
)
from jaxopt_suite.autosgm.windows import autosgm_window

from .optimizer import JaxOptimizer

DEFAULT_MIX_CFG = (False, False, 1e-2, 0.95, 0)
_TUPLES = ("lr_cfg", "beta_cfg", "rc_cfg", "wd_cfg", "eps_cfg")

# suite keyword -> (tuple name, index): lets ``AutoSGM(params, lr=..., beta_i=..., num_lrc=...)`` work too
_KEYWORDS = {
    "aoptlr": ("lr_cfg", 0), "learning_rate": ("lr_cfg", 1), "num_lrc": ("lr_cfg", 2),
    "beta_n": ("beta_cfg", 0), "beta_a": ("beta_cfg", 1), "beta_i": ("beta_cfg", 2), "gamma_i": ("beta_cfg", 3),
    "eta_i": ("beta_cfg", 4), "debias": ("beta_cfg", 5),
    "weight_decay": ("wd_cfg", 0), "wd_level": ("wd_cfg", 1),
    "eps": ("eps_cfg", 0),
}


@functools.lru_cache(maxsize=None)
def _window(rc_cfg: tuple):
    rcm, inseq, x, n, m, tau, spe, cfact, e = rc_cfg
    if rcm == 0:
        return None
    return autosgm_window(rcm, spe=spe, tau=tau, inseq=inseq, x=x, n=n, m=m, cfact=cfact, e=e)


def _bridge_factory(*, aoptlr, num_lrc, debias, wd_level, rc_cfg, maximize, learning_rate, beta_n, beta_a, beta_i,
                    gamma_i, eta_i, weight_decay, eps, one_minus_beta_n, one_minus_beta_a, one_minus_beta_i,
                    one_minus_gamma_i, segments=None):
    """The transformation of one param group: structural options static, numbers traced; ``segments`` is the
    flat buffer's layout (the flat path: the per-tensor rule on one buffer, per-tensor sums per segment).

    The complements 1 − β are formed in double on the host and traced next to the β's, so float32 tracing
    does not degrade them (f32(0.9999) alone would give 1 − β_n = 1.00017e-4).
    """
    return _scale_by_autosgm(
        learning_rate, beta_n, beta_a, beta_i, gamma_i, eta_i, weight_decay, eps,
        aoptlr=aoptlr, num_lrc=num_lrc, debias=debias, wd_level=wd_level, window=_window(rc_cfg),
        maximize=maximize, segments=segments,
        complements={"beta_n": one_minus_beta_n, "beta_a": one_minus_beta_a, "beta_i": one_minus_beta_i,
                     "gamma_i": one_minus_gamma_i},
    )


_bridge_factory.requires_value = False
_bridge_factory.supports_segments = True  # flat path: one buffer per group, per-tensor sums per segment


def _as_tuple(name: str, value: Any) -> tuple:
    if name == "eps_cfg" and not isinstance(value, (tuple, list)):
        return (value,)
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"Invalid {name}: {value!r}; expected a tuple.")
    return tuple(value)


def _structure(group: Mapping[str, Any]) -> dict:
    lr_cfg, beta_cfg, rc_cfg, wd_cfg = (tuple(group[k]) for k in ("lr_cfg", "beta_cfg", "rc_cfg", "wd_cfg"))
    rc = tuple(int(v) if i in (0, 1, 4, 5, 6, 7) else float(v) for i, v in enumerate(rc_cfg))
    return {"aoptlr": bool(lr_cfg[0]), "num_lrc": int(lr_cfg[2]), "debias": bool(beta_cfg[5]),
            "wd_level": int(wd_cfg[1]), "rc_cfg": rc, "maximize": bool(group["maximize"])}


class AutoSGM(JaxOptimizer):
    """AutoSGM (Somefun 2024) as a ``torch.optim.Optimizer``, with the reference's constructor.

    Example (the reference README's configuration)::

        opt = AutoSGM(model.parameters(), lr_cfg=(True, 1e-2, 3),
                      beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True),
                      rc_cfg=(1, 0, 0, 2, 1, num_epochs, iters_per_epoch, 1, 0),
                      wd_cfg=(0.0, 1), eps_cfg=(1e-10,))

    Every param group may override any tuple (e.g. ``{"params": ..., "wd_cfg": (0.0, 0)}``) and gets its own
    JAX transformation. ``group['lr']`` (initialised to the group's ``lr_cfg[1]``) is the live learning rate
    a scheduler changes; the numeric entries of the tuples (β's, γ, η, λ, ε) are read at every step too.
    Changing a structural entry (aoptlr, num_lrc, debias, wd_level, the window, maximize) after the group's
    first step raises ``ValueError``. The suite's keyword names (``lr=``, ``beta_i=``, ``num_lrc=``...)
    are accepted as well and override the matching tuple entries.

    ``state_dict`` per parameter: ``step`` (int64 tensor), ``g_sm``, ``g_var``, ``pc``, ``wsq``, ``pcx``,
    ``lr_num``, ``cmag``, ``cvar`` (those that exist for the configuration). A parameter whose ``.grad`` is
    None is skipped (its ``step`` does not advance). ``dbg`` and ``step(history=...)`` are accepted and
    ignored.
    """

    entry_name = "autosgm_adam"  # only for the base class's bookkeeping; groups use their own transformation
    state_keys = {
        "step": "AutoSGMState.count", "g_sm": "AutoSGMState.grad_filter", "g_var": "AutoSGMState.moment",
        "pc": "AutoSGMState.numerator", "wsq": "AutoSGMState.wsq", "pcx": "AutoSGMState.pcx",
        "lr_num": "AutoSGMState.lr_num", "cmag": "AutoSGMState.huber_mean", "cvar": "AutoSGMState.huber_var",
    }
    elementwise = False
    group_flag_defaults = {"maximize": False, "dbg": False, "mix_cfg": DEFAULT_MIX_CFG}

    def __init__(self, params, *, lr_cfg=DEFAULT_LR_CFG, beta_cfg=DEFAULT_BETA_CFG, rc_cfg=DEFAULT_RC_CFG,
                 wd_cfg=DEFAULT_WD_CFG, eps_cfg=DEFAULT_EPS_CFG, mix_cfg=DEFAULT_MIX_CFG, maximize=False,
                 dbg=False, lr=None, flat=True, nonfinite="propagate", **keywords):
        tuples = {"lr_cfg": lr_cfg, "beta_cfg": beta_cfg, "rc_cfg": rc_cfg, "wd_cfg": wd_cfg, "eps_cfg": eps_cfg}
        tuples = {k: list(_as_tuple(k, v)) for k, v in tuples.items()}
        if lr is not None:
            keywords["learning_rate"] = lr
        for name, value in keywords.items():
            if name not in _KEYWORDS:
                raise TypeError(f"AutoSGM got an unexpected keyword argument {name!r}")
            which, index = _KEYWORDS[name]
            tuples[which][index] = value
        defaults = {k: tuple(v) for k, v in tuples.items()}
        defaults.update(lr=defaults["lr_cfg"][1], mix_cfg=validate_mix_cfg(mix_cfg), maximize=maximize, dbg=dbg)
        self._first_structure: dict[int, dict] = {}
        super().__init__(params, defaults=defaults, flat=flat, nonfinite=nonfinite)

    # ---- groups -------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a group; its own ``lr_cfg`` (if any) initialises its ``'lr'``; the tuples are validated."""
        for name in _TUPLES + ("mix_cfg",):
            if name in param_group:
                param_group[name] = _as_tuple(name, param_group[name])
        if "lr_cfg" in param_group and "lr" not in param_group:
            param_group["lr"] = param_group["lr_cfg"][1]
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        super().add_param_group(param_group)

    @staticmethod
    def _validate_group(group: Mapping[str, Any]) -> None:
        validate_mix_cfg(group.get("mix_cfg", DEFAULT_MIX_CFG))
        cfg = config_from_tuples(group["lr_cfg"], group["beta_cfg"], group["rc_cfg"], group["wd_cfg"],
                                 group["eps_cfg"], group.get("maximize", False))
        cfg["learning_rate"] = group.get("lr", cfg["learning_rate"])
        if not isinstance(cfg["learning_rate"], torch.Tensor):
            _scale_by_autosgm(**cfg)  # range checks with messages naming the argument

    # ---- the bridge hooks ---------------------------------------------------------------------
    def _group_kinds(self):
        kinds, optional = super()._group_kinds()
        kinds["lr"] = DEFAULT_LR_CFG[1]  # the signature's lr=None only means "take lr_cfg[1]"
        return kinds, optional

    def _entry_for_group(self, group):
        return _bridge_factory

    def _hyperparams(self, group):
        beta_n, beta_a, beta_i, gamma_i, eta_i, _ = group["beta_cfg"]
        eps_cfg = group["eps_cfg"] if isinstance(group["eps_cfg"], (tuple, list)) else (group["eps_cfg"],)
        beta_n, beta_a, beta_i, gamma_i = (float(v) for v in (beta_n, beta_a, beta_i, gamma_i))
        return {
            "learning_rate": float(group["lr"]),
            "beta_n": beta_n, "beta_a": beta_a, "beta_i": beta_i, "gamma_i": gamma_i, "eta_i": float(eta_i),
            "weight_decay": float(group["wd_cfg"][0]), "eps": float(eps_cfg[0]),
            "one_minus_beta_n": 1.0 - beta_n, "one_minus_beta_a": 1.0 - beta_a,
            "one_minus_beta_i": 1.0 - beta_i, "one_minus_gamma_i": 1.0 - gamma_i,
        }

    def _static_config(self, group):
        return _structure(group)

    def _state_value_to_torch(self, key, value, param):
        if key == "step":
            return torch.tensor(int(np.asarray(value)), dtype=torch.int64)
        return super()._state_value_to_torch(key, value, param)

    # ---- checkpoint conversion (torch_bridge.checkpoint) ---------------------------------------
    # The smoothing filter's state has two representations (jaxopt_suite.autosgm.filters.lowpass): with γ_i
    # a concrete 0 it holds the pre-pole sum q_t, otherwise S_t = β_i·q_t. The bridge traces γ_i, so its
    # state (and torch's ``g_sm``) is S_t; a JAX transformation built from Python numbers with γ_i = 0 (as
    # ``jaxopt_suite.autosgm(...)`` and the registry build it) holds q_t. The conversions target the latter.
    def _checkpoint_export(self):
        """As :meth:`JaxOptimizer._checkpoint_export`; with γ_i = 0 the filter state is given as q_t = S_t/β_i
        (the next step forms β_i·q_t again: the division is exact up to one rounding)."""
        tx, state, params, kwargs = super()._checkpoint_export()
        if float(kwargs["gamma_i"]) == 0.0 and float(kwargs["beta_i"]) != 0.0 and state.grad_filter is not None:
            beta = float(kwargs["beta_i"])
            state = state._replace(grad_filter=[
                jnp.asarray(np.asarray(s) / np.asarray(beta, np.asarray(s).dtype)) for s in state.grad_filter])
        return tx, state, params, kwargs

    def _checkpoint_import(self, state) -> None:
        """As :meth:`JaxOptimizer._checkpoint_import`; with γ_i = 0 the filter state q_t becomes S_t = β_i·q_t,
        rounded as the next JAX step would form it."""
        group = self.param_groups[0] if len(self.param_groups) == 1 else None
        if group is not None and state.grad_filter is not None:
            hyper = self._hyperparams(group)
            if hyper["gamma_i"] == 0.0:
                beta = hyper["beta_i"]
                state = state._replace(grad_filter=[
                    jnp.asarray(np.asarray(beta, np.asarray(q).dtype) * np.asarray(q)) for q in state.grad_filter])
        super()._checkpoint_import(state)

    # ---- torch.optim API ----------------------------------------------------------------------
    def step(self, closure=None, history=None):
        """One AutoSGM step for every group; returns the closure's loss (``history`` is ignored)."""
        del history
        for index, group in enumerate(self.param_groups):
            now = _structure(group)
            first = self._first_structure.setdefault(index, now)
            if now != first:
                changed = sorted(k for k in now if now[k] != first[k])
                raise ValueError(f"AutoSGM: param group {index} changed structural options {changed} after its "
                                 "first step (aoptlr, num_lrc, debias, wd_level, the window and maximize are "
                                 "fixed per group; numeric entries and 'lr' may change).")
        return super().step(closure)

    def __getstate__(self):
        out = super().__getstate__()
        out["_first_structure"] = dict(self._first_structure)
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_first_structure", {})
