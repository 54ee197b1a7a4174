"""``SGD``: :func:`jaxopt_suite.sgd` behind ``torch.optim.SGD``'s signature."""

from __future__ import annotations

from . import _validate as V
from .optimizer import JaxOptimizer


class SGD(JaxOptimizer):
    """Drop-in for ``torch.optim.SGD`` (momentum, dampening, Nesterov, coupled decay, maximize).

    ``momentum == 0`` runs without a buffer (torch keeps no state then); a non-zero momentum keeps the
    torch state key ``momentum_buffer``. A scheduler may move the momentum between non-zero values
    without recompiling; moving it to or from 0 rebuilds the step once.
    """

    entry_name = "sgd"
    state_keys = {"momentum_buffer": "SGDState.momentum_buffer"}
    presence_fields = ("SGDState.count",)
    _optional_state_keys = {"momentum_buffer": "as in torch.optim.SGD, the parameter counts as not stepped: its "
                                               "momentum buffer starts from the next gradient"}
    elementwise = True
    group_flag_defaults = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False,
                           "fused": False}

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, flat=True, write_back="copy",
                 nonfinite="propagate"):
        # torch.optim.SGD's checks, in its order (a tensor lr: any foreach is fine for SGD)
        V.check_lr(lr, foreach=False, sgd=True)
        V.check_momentum(momentum)
        V.check_weight_decay(weight_decay, sgd=True)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        V.check_flags(foreach=foreach, fused=fused, differentiable=differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults=defaults, flat=flat, write_back=write_back, nonfinite=nonfinite)

    def _hyperparams(self, group):
        out = {"learning_rate": float(group["lr"]), "dampening": float(group["dampening"]),
               "weight_decay": float(group["weight_decay"])}
        if float(group["momentum"]) != 0.0:
            out["momentum"] = float(group["momentum"])
        return out

    def _static_config(self, group):
        static = {"nesterov": bool(group["nesterov"]), "maximize": bool(group["maximize"])}
        if float(group["momentum"]) == 0.0:
            static["momentum"] = None
        return static
