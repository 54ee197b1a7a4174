"""Parity rows for AutoSGM: exact reductions to torch.optim, JAX ↔ torch bridge, and the reference.

* **Reductions** (the AutoSGM specification's table): heavy ball ≡ ``SGD(momentum)``; Nesterov ≡
  ``SGD(nesterov)`` with its first step divided by 1 + β; ``eps = 0`` moment normalisation ≡ ``Adam``,
  ``AdamW`` (λ/(1 − β1), decoupled) and ``RMSprop``. Learning rates are powers of two so that AutoSGM's
  float32 step size carries torch's double exactly.
* **Bridge**: the registry transformation vs ``torch_bridge.AutoSGM`` built from the reference-style
  tuples, for every numerator (num_lrc 0–4) and several windows.
* **Reference**: the unlicensed reference implementation is never vendored; rows against it run when
  ``AUTOSGM_REFERENCE`` names a checkout (else they are SKIP). Closed loop (each side its own gradient).

Tolerances (max |Δθ| over 100 steps) come from the error model of :func:`parity.runner.rounding_response`
(K δ, K = 8: δ scales with the dtype, the steps and each problem's conditioning).
"""

from __future__ import annotations

from types import MappingProxyType

from .references import TorchReference, torch_optim
from .runner import ParityCase

STEPS = 100
GRID = [("quad", "float64"), ("quad", "float32"), ("mlp", "float64"), ("mlp", "float32")]
SHORT = {"float64": "f64", "float32": "f32"}
BETA, BETA2, WD = 0.9, 0.999, 1e-2
LR_SGD, LR_ADAM = 2.0**-6, 2.0**-7
BETAS = (0.9999, 0.999, 0.9, 0.0, 0.0, True)


class _Scheduled:
    """A torch optimizer stepped together with a ``LambdaLR`` (one scheduler step per optimizer step)."""

    def __init__(self, opt, lr_lambda):
        import torch

        self._opt = opt
        self._sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        self.state = opt.state

    def step(self):
        self._opt.step()
        self._sched.step()


def _nesterov_first_step(params):
    import torch

    opt = torch.optim.SGD(params, lr=LR_SGD, momentum=BETA, nesterov=True, foreach=False)
    return _Scheduled(opt, lambda k: 1.0 / (1.0 + BETA) if k == 0 else 1.0)


def _bridge(tuples):
    def build(params):
        from torch_bridge import AutoSGM

        return AutoSGM(params, **tuples)

    return TorchReference(name="torch_bridge.AutoSGM", kwargs=MappingProxyType(dict(tuples)), build=build)


def _reference(tuples):
    def build(params):
        from . import autosgm_upstream

        asgm = autosgm_upstream.load_reference()
        if asgm is None:
            raise ModuleNotFoundError(f"asgm (set {autosgm_upstream.ENV_VAR} to a reference checkout)",
                                      name=f"asgm (set {autosgm_upstream.ENV_VAR})")
        return asgm.AutoSGM(params, **tuples)

    return TorchReference(name="reference asgm.AutoSGM", kwargs=MappingProxyType(dict(tuples)), build=build)


def _from_tuples(tuples):
    """Our kwargs (evaluated at run time: the window is a callable) for a reference-style configuration."""

    def kwargs():
        from jaxopt_suite.autosgm import config_from_tuples

        return config_from_tuples(**tuples)

    return kwargs


def _rows(stem, entry, kwargs, reference, *, grid=GRID, wrong=None, problem_suffix=""):
    return [
        ParityCase(
            name=f"{stem}_{problem}{problem_suffix}_{SHORT[dtype]}", entry=entry, kwargs=kwargs, reference=reference,
            problem=problem + problem_suffix, dtype=dtype, steps=STEPS,
            wrong=wrong,
        )
        for problem, dtype in grid
    ]


ADAM_LIKE = dict(learning_rate=LR_ADAM, beta_i=BETA, beta_a=BETA2, eta_i=0.0, eps=0.0)

CASES: list[ParityCase] = []

# ---- reductions to torch.optim -------------------------------------------------------------------
CASES += _rows("autosgm_hb_vs_sgd_momentum", "autosgm_hb", {"learning_rate": LR_SGD},
               torch_optim("SGD", lr=LR_SGD, momentum=BETA),
               wrong=torch_optim("SGD", lr=LR_SGD, momentum=0.8))
CASES += _rows("autosgm_hb_maximize_vs_sgd", "autosgm_hb", {"learning_rate": LR_SGD, "maximize": True},
               torch_optim("SGD", lr=LR_SGD, momentum=BETA, maximize=True), problem_suffix="_neg",
               grid=[("quad", "float64"), ("quad", "float32")])
CASES += _rows("autosgm_nag_vs_sgd_nesterov", "autosgm_nag", {"learning_rate": LR_SGD},
               TorchReference(name="torch.optim.SGD(nesterov) first lr/(1+β)", build=_nesterov_first_step),
               wrong=torch_optim("SGD", lr=LR_SGD, momentum=BETA, nesterov=True))
CASES += _rows("autosgm_adam_eps0_vs_adam", "autosgm_adam", ADAM_LIKE,
               torch_optim("Adam", lr=LR_ADAM, betas=(BETA, BETA2), eps=0.0),
               grid=[("quad", "float64"), ("quad", "float32")])
CASES += _rows("autosgm_adam_eps0_vs_adamw", "autosgm_adam",
               {**ADAM_LIKE, "weight_decay": WD / (1 - BETA), "wd_level": 1},
               torch_optim("AdamW", lr=LR_ADAM, betas=(BETA, BETA2), eps=0.0, weight_decay=WD),
               wrong=torch_optim("AdamW", lr=LR_ADAM, betas=(BETA, BETA2), eps=0.0, weight_decay=WD * 10),
               # λ/(1 − β1) and the decoupled factor (1 − β1) are each rounded once: a constant relative
               # error of the decay, inside the error model's bar (measured 0.8-1.0 δ)
               grid=[("quad", "float64"), ("quad", "float32")])
CASES += _rows("autosgm_rms_vs_rmsprop", "autosgm_adam",
               {"learning_rate": LR_ADAM, "beta_i": 0.0, "beta_a": BETA2, "debias": False, "eps": 0.0},
               torch_optim("RMSprop", lr=LR_ADAM, alpha=BETA2, eps=0.0),
               grid=[("quad", "float64"), ("quad", "float32")])

# ---- JAX ↔ torch bridge ----------------------------------------------------------------------------
BRIDGE_CONFIGS = {
    "num_lrc0_cosine": dict(lr_cfg=(True, 1e-2, 0), beta_cfg=BETAS, rc_cfg=(1, 0, 0, 2, 1, 1, 60, 1, 0),
                            eps_cfg=(1e-8,)),
    "num_lrc1_nag_full_poly": dict(lr_cfg=(True, 1e-2, 1), beta_cfg=(0.9999, 0.999, 0.9, 0.9 / 1.9, 0, True),
                                   rc_cfg=(2, 0, 0.1, 1, 0, 1, 40, 1, 0), wd_cfg=(1e-3, 0)),
    "num_lrc2_exp_window": dict(lr_cfg=(True, 1e-2, 2), beta_cfg=(0.9999, 0.999, 0.9, 0.55, 0, True),
                                rc_cfg=(3, 0, 0, 0.5, 1, 1, 25, 1, 0), wd_cfg=(1e-2, 1)),
    "num_lrc3_staircase": dict(lr_cfg=(True, 1e-2, 3), beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True),
                               rc_cfg=(1, 0, 0, 2, 1, 1, 45, 3, 0), wd_cfg=(1e-2, 1)),
    "num_lrc4_huber": dict(lr_cfg=(True, 1e-2, 4), beta_cfg=BETAS, eps_cfg=(1e-8,)),
}
for _name, _tuples in BRIDGE_CONFIGS.items():
    CASES += _rows(f"autosgm_{_name}_vs_bridge", "autosgm_adam", _from_tuples(_tuples), _bridge(_tuples),
                   grid=[("quad", "float64"), ("mlp", "float32")])

# ---- the reference implementation (only with AUTOSGM_REFERENCE) ------------------------------------
REFERENCE_CONFIGS = {
    "readme_opt7": dict(lr_cfg=(True, 1e-2, 3), beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True),
                        rc_cfg=(1, 0, 0, 2, 1, 1, 100, 1, 0), wd_cfg=(0.0, 1), eps_cfg=(1e-10,)),
    "parcor_logistic_full": dict(lr_cfg=(True, 1e-2, 1), beta_cfg=BETAS, rc_cfg=(5, 0, 0, 4, 0, 1, 30, 1, 0.3)),
    "huber_parcor_decoupled": dict(lr_cfg=(True, 1e-2, 2), beta_cfg=(0.9999, 0.999, 0.9, 0.55, 0, True),
                                   rc_cfg=(3, 0, 0, 0.5, 1, 1, 25, 1, 0), wd_cfg=(1e-2, 1)),
}
for _name, _tuples in REFERENCE_CONFIGS.items():
    CASES += _rows(f"autosgm_{_name}_vs_reference", "autosgm_adam", _from_tuples(_tuples), _reference(_tuples),
                   grid=[("mlp", "float64"), ("mlp", "float32")])
