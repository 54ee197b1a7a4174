"""``ASGD``: :func:`jaxopt_suite.asgd` behind ``torch.optim.ASGD``'s signature (plus ``momentum``)."""

from __future__ import annotations

import contextlib

import torch

import jaxopt_suite

from . import _validate as V
from .adopt import registry_or
from .optimizer import JaxOptimizer


class ASGD(JaxOptimizer):
    """Drop-in for ``torch.optim.ASGD`` (single-tensor path), with an optional keyword ``momentum``.

    Torch state keys ``step``, ``eta``, ``mu``, ``ax`` (plus ``momentum_buffer`` when momentum != 0); ``eta``
    and ``mu`` are kept in torch's scalar dtype (float32 unless torch's default dtype is float64).
    ``momentum=0`` is exactly torch's ASGD. Use :meth:`averaged` to evaluate on the averaged weights ``ax``.
    """

    state_keys = {"step": "ASGDState.count", "eta": "ASGDState.eta", "mu": "ASGDState.avg_weight",
                  "ax": "ASGDState.ax", "momentum_buffer": "ASGDState.momentum_buffer"}
    elementwise = True
    group_flag_defaults = {"foreach": None, "maximize": False, "differentiable": False, "capturable": False,
                           "momentum": 0.0}

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0, foreach=None,
                 maximize=False, differentiable=False, capturable=False, *, momentum=0.0, flat=True,
                 write_back="copy", nonfinite="propagate"):
        # torch.optim.ASGD's checks, in its order (lambd, alpha, t0: see JaxOptimizer._check_group)
        V.check_lr(lr, foreach=False)
        V.check_weight_decay(weight_decay)
        V.check_momentum(momentum)
        # ASGD has no fused option; differentiable=True is accepted and ignored with a warning, as on the
        # other classes (it was silently ignored here)
        V.check_flags(foreach=foreach, differentiable=differentiable)
        self.scalar_dtype = None  # torch's scalar dtype, fixed at the first step as torch creates its state
        defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, capturable=capturable,
                        momentum=momentum)
        super().__init__(params, registry_or("asgd", jaxopt_suite.asgd), defaults=defaults, flat=flat,
                         write_back=write_back, nonfinite=nonfinite)

    _persistent_attrs = ("scalar_dtype",)

    def _hyperparams(self, group):
        out = {"learning_rate": float(group["lr"]), "lambd": float(group["lambd"]),
               "alpha": float(group["alpha"]), "t0": float(group["t0"]),
               "weight_decay": float(group["weight_decay"])}
        if float(group["momentum"]) != 0.0:
            out["momentum"] = float(group["momentum"])
        return out

    def _validation_static(self, group):
        # as _static_config, without fixing the scalar dtype (torch fixes it at the first step)
        static = {"maximize": bool(group["maximize"]), "scalar_dtype": self.scalar_dtype or "float32"}
        if float(group["momentum"]) == 0.0:
            static["momentum"] = None
        return static

    def _static_config(self, group):
        if self.scalar_dtype is None:
            self.scalar_dtype = "float64" if torch.get_default_dtype() == torch.float64 else "float32"
        static = {"maximize": bool(group["maximize"]), "scalar_dtype": self.scalar_dtype}
        if float(group["momentum"]) == 0.0:
            static["momentum"] = None
        return static

    def _state_value_to_torch(self, key, value, param):
        """``eta`` and ``mu`` keep the dtype their torch-side entry already has.

        torch.optim.ASGD creates them in its scalar dtype, but its ``load_state_dict`` casts them to the
        parameter's dtype (every floating entry but ``step``) and its later steps ``copy_`` the new values into
        those tensors, so after a reload a float64 parameter's ``eta`` is a float64 tensor holding the
        float32-rounded value. The bridge computes in its scalar dtype as before and only reports the value in
        the dtype of the entry it replaces (for float16/bfloat16 parameters torch's later steps then also use
        the rounded ``eta``; that is not reproduced).
        """
        out = super()._state_value_to_torch(key, value, param)
        if key in ("eta", "mu") and torch.is_tensor(out):
            current = dict.get(self.state, param)
            old = current.get(key) if isinstance(current, dict) else None
            if torch.is_tensor(old) and old.is_floating_point() and old.dtype != out.dtype:
                out = out.to(old.dtype)
        return out

    @contextlib.contextmanager
    def averaged(self):
        """Temporarily put the averaged weights ``ax`` into the parameters (for evaluation)."""
        saved = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and "ax" in st:
                        saved.append((p, p.detach().clone()))
                        p.copy_(st["ax"])
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)
