"""``ADOPT``: :func:`jaxopt_suite.adopt` behind the official torch-adopt ``ADOPT`` signature."""

from __future__ import annotations

import jaxopt_suite
from jaxopt_suite import registry

from . import _validate as V
from .optimizer import JaxOptimizer


def registry_or(name, factory):
    """The registry entry ``name`` when registered, else the factory itself (same transformation)."""
    return name if name in registry.names() else factory


class ADOPT(JaxOptimizer):
    """Drop-in for ``adopt.ADOPT`` (torch-adopt 0.1.0): ``decouple``, ``clip_lambda``, maximize.

    The first step of each parameter only sets ``exp_avg_sq`` (no parameter change), as in the official
    rule. ``clip_lambda`` receives the traced step count (a JAX scalar), so it must be written with
    operations that work on JAX arrays (``s ** 0.25`` does); ``None`` disables clipping. Torch state keys:
    ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    state_keys = {"step": "ADOPTState.count", "exp_avg": "ADOPTState.mu", "exp_avg_sq": "ADOPTState.nu"}
    elementwise = True
    group_flag_defaults = {"maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                           "fused": None, "decouple": False}
    _persistent_attrs = ("clip_lambda",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6,
                 clip_lambda=jaxopt_suite.default_clip_value, weight_decay=0.0, decouple=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None, flat=True,
                 write_back="copy", nonfinite="propagate"):
        V.check_lr(lr, foreach=foreach, capturable=capturable)
        V.check_eps(eps)
        V.check_beta(betas, 0)
        V.check_beta(betas, 1)
        V.check_weight_decay(weight_decay)
        if fused:
            raise RuntimeError("`fused` is not currently supported")
        V.check_flags(foreach=foreach, fused=fused, differentiable=differentiable)
        self.clip_lambda = clip_lambda
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decouple=decouple,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, registry_or("adopt", jaxopt_suite.adopt), defaults=defaults, flat=flat,
                         write_back=write_back, nonfinite=nonfinite)

    def _hyperparams(self, group):
        b1, b2 = group["betas"]
        return {"learning_rate": float(group["lr"]), "b1": float(b1), "b2": float(b2),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}

    def _static_config(self, group):
        return {"decouple": bool(group["decouple"]), "maximize": bool(group["maximize"]),
                "clip_value_fn": self.clip_lambda}
