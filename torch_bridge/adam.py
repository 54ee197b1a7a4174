"""``Adam`` and ``AdamW``: :func:`jaxopt_suite.adam` behind ``torch.optim.Adam`` / ``AdamW``'s signatures."""

from __future__ import annotations

from . import _validate as V
from .optimizer import JaxOptimizer


class Adam(JaxOptimizer):
    """Drop-in for ``torch.optim.Adam`` (coupled L2 decay; AMSGrad; maximize; ``decoupled_weight_decay``).

    Torch state keys: ``step`` (0-d float32), ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` with
    amsgrad. ``lr`` and ``betas`` may be tensors or scheduled (OneCycleLR moves ``betas``) without
    recompiling.
    """

    entry_name = "adam"
    state_keys = {"step": "AdamState.count", "exp_avg": "AdamState.mu", "exp_avg_sq": "AdamState.nu",
                  "max_exp_avg_sq": "AdamState.nu_max"}
    elementwise = True
    group_flag_defaults = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                           "differentiable": False, "decoupled_weight_decay": False, "fused": None}
    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=None, flat=True, write_back="copy", nonfinite="propagate"):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        V.check_lr(lr, foreach=foreach, capturable=capturable)
        V.check_eps(eps)
        V.check_beta(betas, 0)
        V.check_beta(betas, 1)
        V.check_weight_decay(weight_decay)
        betas = V.check_beta_kinds(betas, foreach=foreach, capturable=capturable)
        V.check_flags(foreach=foreach, fused=fused, differentiable=differentiable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults=defaults, flat=flat, write_back=write_back, nonfinite=nonfinite)

    def _hyperparams(self, group):
        b1, b2 = group["betas"]
        return {"learning_rate": float(group["lr"]), "b1": float(b1), "b2": float(b2),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}

    def _static_config(self, group):
        return {"amsgrad": bool(group["amsgrad"]), "maximize": bool(group["maximize"]),
                "decoupled_weight_decay": bool(group["decoupled_weight_decay"])}


class AdamW(Adam):
    """Drop-in for ``torch.optim.AdamW``: Adam with decoupled decay, ``weight_decay`` defaulting to 1e-2."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, flat=True,
                 write_back="copy", nonfinite="propagate"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, flat=flat, write_back=write_back, nonfinite=nonfinite)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
