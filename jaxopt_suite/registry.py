"""The registry: every optimizer of the suite described once.

Tests, the torch bridge, the parity runner, the benchmarks and the main job read this table instead of
special-casing optimizer names. An entry says how to build the optimizer, which extra arguments its
``update`` needs, which arguments are static for ``optax.inject_hyperparams`` (as its factory declares
them), its torch-style defaults and state-key names, and settings known to work on the contract problems
and on the digits demo.

Several entries may share one factory (e.g. two modes of ELRA, several AutoSGM configurations): the entry
name is the unit that tests, parity rows and demo rows are keyed by.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

# Import functions, not modules: the package re-exports functions named like their modules
# (``jaxopt_suite.sgd`` is the function), so ``from . import sgd`` would not give the module.
from ._common import factory_signature, static_args_of
from .nonfinite import NONFINITE_POLICIES
from .adam import adam, adamw
from .adopt import adopt
from .asgd import asgd
from .autosgm import autosgm
from .elra import elra
from .enhanced_sgd import enhanced_sgd
from .lookahead import lookahead_adam, lookahead_sgd
from .sgd import sgd


def _frozen(d: Optional[Mapping[str, Any]] = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer as the rest of the project sees it.

    Attributes:
      name: unique registry key (``"adam"``, ``"elra_dnn"``...).
      factory: the public ``jaxopt_suite`` factory.
      family: the module/family name (``"adam"``, ``"elra"``...).
      kwargs: arguments that distinguish this entry from the bare factory (e.g. a mode or configuration);
        every use of the entry passes them.
      requires_value: ``update`` needs the keyword ``value`` (the loss).
      static_args: argument names that ``inject_hyperparams`` must treat as static: not an entry field
        but the factory's own declaration (``_common.declare_static``), which
        ``jaxopt_suite.inject_hyperparams`` applies by itself.
      hyperparams: numeric hyperparameter names that may be injected/traced (the bridge reads these from
        its param groups every step).
      converge: per contract problem (``"parabola"``, ``"rosenbrock"``) the kwargs known to reach the
        target within 10,000 steps; missing problems are not claimed.
      demo_kwargs: settings for the digits MLP comparison (the main job).
      torch_demo_kwargs: the torch-named constructor arguments of the demo's torch rows, when renaming
        ``demo_kwargs`` would not mean the same thing there (e.g. a layout-dependent axis); ``None``: renamed
        from ``demo_kwargs``. The demo adds its ``seed`` to stochastic entries either way.
      torch_class: the ``torch.optim`` class reproduced exactly, if any (``"Adam"``...).
      torch_bridge_class: name of the class in ``torch_bridge``.
      torch_state_keys: per-parameter state keys in the torch ``state_dict``.
      torch_reference: dotted import path of the torch implementation reproduced exactly when it is not
        in ``torch.optim`` (``"adopt.ADOPT"`` from torch-adopt), else ``None``.
      supports_complex: whether complex parameters are supported.
      supports_segments: the factory accepts ``segments=FlatLayout`` (flat bridge path).
      stochastic: the update uses randomness (a PRNG key in state).
      supports_schedules: ``learning_rate`` may be an optax schedule (used with optax's count: 0 at the first
        update); False: the factory rejects one at construction (ValueError naming ``learning_rate``).
      supports_grad_mask: ``update`` honours the ``grad_mask`` extra arg (torch's skip of parameters without
        a gradient): a False leaf gets an exactly zero update and bit-identical state.
      description: one line for tables.
      nonfinite_policies: the values the factory's ``nonfinite`` option takes (:mod:`jaxopt_suite.nonfinite`),
        read from the factory (``()`` for a factory without the option); the default is ``"propagate"``.
      nonfinite_checks_value: the policy also checks the loss ``value`` (entries that take one).
    """

    name: str
    factory: Callable[..., Any]
    family: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=_frozen)
    requires_value: bool = False
    static_args: tuple[str, ...] = dataclasses.field(init=False)
    hyperparams: tuple[str, ...] = ()
    converge: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=_frozen)
    demo_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=_frozen)
    torch_demo_kwargs: Optional[Mapping[str, Any]] = None
    torch_class: Optional[str] = None
    torch_bridge_class: Optional[str] = None
    torch_state_keys: tuple[str, ...] = ()
    torch_reference: Optional[str] = None
    supports_complex: bool = True
    supports_segments: bool = True
    stochastic: bool = False
    supports_grad_mask: bool = False
    supports_schedules: bool = True
    description: str = ""
    nonfinite_policies: tuple[str, ...] = dataclasses.field(init=False)
    nonfinite_checks_value: bool = dataclasses.field(init=False)

    def __post_init__(self):
        # one list per factory, declared next to it; the entry only reads it
        object.__setattr__(self, "static_args", static_args_of(self.factory))
        has = "nonfinite" in factory_signature(self.factory).parameters
        object.__setattr__(self, "nonfinite_policies", NONFINITE_POLICIES if has else ())
        object.__setattr__(self, "nonfinite_checks_value", bool(getattr(inspect.unwrap(self.factory),
                                                                        "nonfinite_checks_value", False)))

    def build(self, **overrides: Any):
        """The transformation with the entry's kwargs updated by ``overrides``."""
        return self.factory(**{**self.kwargs, **overrides})


_ENTRIES: dict[str, OptimizerEntry] = {}


def register(entry: OptimizerEntry) -> OptimizerEntry:
    """Add an entry; names are unique."""
    if entry.name in _ENTRIES:
        raise ValueError(f"duplicate registry entry {entry.name!r}")
    _ENTRIES[entry.name] = entry
    return entry


def get(name: str) -> OptimizerEntry:
    """The entry called ``name`` (``KeyError`` listing the known names otherwise)."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; known: {sorted(_ENTRIES)}") from None


def names() -> list[str]:
    """All registered names, in registration order."""
    return list(_ENTRIES)


def entries() -> list[OptimizerEntry]:
    """All entries, in registration order."""
    return list(_ENTRIES.values())


# ------------------------------------------------------------------------------------------------
# torch-semantics family (torch_semantics.md)
# ------------------------------------------------------------------------------------------------

register(OptimizerEntry(
    name="sgd",
    factory=sgd,
    family="sgd",
    kwargs={"momentum": 0.9},
    hyperparams=("learning_rate", "momentum", "dampening", "weight_decay"),
    converge={"parabola": {"learning_rate": 1e-2}, "rosenbrock": {"learning_rate": 1e-4}},
    demo_kwargs={"learning_rate": 0.05, "momentum": 0.9},
    torch_class="SGD",
    torch_bridge_class="SGD",
    supports_grad_mask=True,
    torch_state_keys=("momentum_buffer",),
    description="SGD with heavy-ball momentum (torch.optim.SGD)",
))

register(OptimizerEntry(
    name="adam",
    factory=adam,
    family="adam",
    hyperparams=("learning_rate", "b1", "b2", "eps", "weight_decay"),
    converge={"parabola": {"learning_rate": 1e-1}, "rosenbrock": {"learning_rate": 1e-2}},
    demo_kwargs={"learning_rate": 1e-3},
    torch_class="Adam",
    torch_bridge_class="Adam",
    supports_grad_mask=True,
    torch_state_keys=("step", "exp_avg", "exp_avg_sq"),
    description="Adam, coupled L2 (torch.optim.Adam)",
))

register(OptimizerEntry(
    name="adamw",
    factory=adamw,
    family="adam",
    hyperparams=("learning_rate", "b1", "b2", "eps", "weight_decay"),
    converge={"parabola": {"learning_rate": 1e-1, "weight_decay": 0.0},
              "rosenbrock": {"learning_rate": 1e-2, "weight_decay": 0.0}},
    demo_kwargs={"learning_rate": 1e-3},
    torch_class="AdamW",
    torch_bridge_class="AdamW",
    supports_grad_mask=True,
    torch_state_keys=("step", "exp_avg", "exp_avg_sq"),
    description="AdamW, decoupled decay (torch.optim.AdamW)",
))

# ADOPT (torch_semantics.md §4): the official torch-adopt 0.1.0 rule.
register(OptimizerEntry(
    name="adopt",
    supports_grad_mask=True,
    factory=adopt,
    family="adopt",
    hyperparams=("learning_rate", "b1", "b2", "eps", "weight_decay"),
    converge={"parabola": {"learning_rate": 3e-2}, "rosenbrock": {"learning_rate": 3e-2}},
    demo_kwargs={"learning_rate": 1e-3},
    torch_bridge_class="ADOPT",
    torch_state_keys=("step", "exp_avg", "exp_avg_sq"),
    torch_reference="adopt.ADOPT",
    description="ADOPT, clipped official rule (torch-adopt 0.1.0)",
))

# ASGD (torch_semantics.md §6). ``momentum`` is structural (None = torch's rule without a buffer), so the
# momentum variant is its own entry; the bridge maps torch's ``momentum=0.0`` to the first one.
register(OptimizerEntry(
    name="asgd",
    supports_grad_mask=True,
    factory=asgd,
    family="asgd",
    hyperparams=("learning_rate", "lambd", "alpha", "t0", "weight_decay"),
    converge={"parabola": {"learning_rate": 1e-2}, "rosenbrock": {"learning_rate": 1e-3}},
    demo_kwargs={"learning_rate": 0.05},
    torch_class="ASGD",
    torch_bridge_class="ASGD",
    torch_state_keys=("step", "eta", "mu", "ax"),
    description="Averaged SGD (torch.optim.ASGD)",
))

register(OptimizerEntry(
    name="asgd_momentum",
    supports_grad_mask=True,
    factory=asgd,
    family="asgd",
    kwargs={"momentum": 0.9},
    hyperparams=("learning_rate", "lambd", "alpha", "t0", "weight_decay", "momentum"),
    converge={"parabola": {"learning_rate": 1e-3}, "rosenbrock": {"learning_rate": 1e-3}},
    demo_kwargs={"learning_rate": 0.05},
    torch_bridge_class="ASGD",
    torch_state_keys=("step", "eta", "mu", "ax", "momentum_buffer"),
    description="Averaged SGD with a momentum buffer (lambd = 0: torch SGD with momentum)",
))

# Lookahead (torch_semantics.md §5). Lookahead needs an inner optimizer, so each entry is one factory that
# builds ``lookahead(inner(...), sync_period, slow_step_size, reset=...)``: every numeric argument, the
# inner ones and ``sync_period``/``slow_step_size`` alike, is a plain argument that inject_hyperparams can
# trace and the bridge can read from a param group (its ``k``/``alpha`` map to sync_period/slow_step_size).
register(OptimizerEntry(
    name="lookahead_sgd",
    supports_grad_mask=True,
    factory=lookahead_sgd,
    family="lookahead",
    kwargs={"momentum": 0.9},
    hyperparams=("learning_rate", "momentum", "dampening", "weight_decay", "sync_period", "slow_step_size"),
    converge={"parabola": {"learning_rate": 1e-2}, "rosenbrock": {"learning_rate": 1e-3}},
    demo_kwargs={"learning_rate": 0.05},
    torch_bridge_class="Lookahead",
    torch_state_keys=("momentum_buffer", "slow_param"),
    description="Lookahead over SGD with momentum (seed formula, alpha weights the fast weights)",
))

register(OptimizerEntry(
    name="lookahead_adam",
    supports_grad_mask=True,
    factory=lookahead_adam,
    family="lookahead",
    hyperparams=("learning_rate", "b1", "b2", "eps", "weight_decay", "sync_period", "slow_step_size"),
    converge={"parabola": {"learning_rate": 1e-1}, "rosenbrock": {"learning_rate": 3e-2}},
    demo_kwargs={"learning_rate": 1e-3},
    torch_bridge_class="Lookahead",
    torch_state_keys=("step", "exp_avg", "exp_avg_sq", "slow_param"),
    description="Lookahead over Adam (torch.optim.Adam inner)",
))


# ------------------------------------------------------------------------------------------------
# AutoSGM family (autosgm.md): named points of the lowpass-filter / learning-rate design space
# ------------------------------------------------------------------------------------------------

_AUTOSGM_HYPER = ("learning_rate", "beta_n", "beta_a", "beta_i", "gamma_i", "eta_i", "weight_decay", "eps")
_AUTOSGM_STATE = ("step", "g_sm", "g_var", "pc", "wsq", "pcx", "lr_num", "cmag", "cvar")


def _autosgm_entry(name, kwargs, *, converge=None, demo_kwargs=None, description=""):
    return OptimizerEntry(
        name=name,
        factory=autosgm,
        family="autosgm",
        kwargs=kwargs,
        hyperparams=_AUTOSGM_HYPER,
        converge=converge or {},
        demo_kwargs=demo_kwargs or {},
        torch_bridge_class="AutoSGM",
        torch_state_keys=_AUTOSGM_STATE,
        supports_complex=False,
        supports_grad_mask=True,
        description=description,
    )


register(_autosgm_entry(
    "autosgm_hb",
    {"aoptlr": False, "beta_i": 0.9, "eta_i": 1.0, "debias": False},
    converge={"parabola": {"learning_rate": 1e-2}, "rosenbrock": {"learning_rate": 1e-3}},
    demo_kwargs={"learning_rate": 0.05},
    description="AutoSGM heavy ball (= torch SGD momentum 0.9)",
))

register(_autosgm_entry(
    "autosgm_nag",
    {"aoptlr": False, "beta_i": 0.9, "gamma_i": 0.9 / 1.9, "eta_i": 1.0, "debias": False},
    converge={"parabola": {"learning_rate": 1e-2}, "rosenbrock": {"learning_rate": 1e-3}},
    demo_kwargs={"learning_rate": 0.05},
    description="AutoSGM Nesterov (filter zero beta/(1+beta))",
))

register(_autosgm_entry(
    "autosgm_adam",
    {"aoptlr": True, "num_lrc": 0, "beta_i": 0.9, "beta_a": 0.999, "eps": 1e-8},
    converge={"parabola": {"learning_rate": 1e-1}, "rosenbrock": {"learning_rate": 1e-2}},
    demo_kwargs={"learning_rate": 3e-3},
    description="AutoSGM moment-normalised EMA (Adam-like, eps inside and outside the root)",
))

register(_autosgm_entry(
    "autosgm_parcor",
    {"aoptlr": True, "num_lrc": 1, "beta_i": 0.9, "gamma_i": 0.5528},
    # not Rosenbrock: from (0, 0) the parcor numerator α0·w·v is zero and the iterate never leaves the start
    converge={"parabola": {"learning_rate": 1e-2}},
    demo_kwargs={"learning_rate": 1e-2},
    description="AutoSGM parcor learning-rate numerator (num_lrc=1), filter zero 0.5528",
))


# ------------------------------------------------------------------------------------------------
# ELRA family (elra.md): one factory, two modes selected by the static ``classes``
# ------------------------------------------------------------------------------------------------

register(OptimizerEntry(
    name="elra_math",
    factory=elra,
    family="elra",
    kwargs={"classes": 0},
    requires_value=True,
    hyperparams=("learning_rate", "weight_decay", "warmup", "momentum"),
    converge={"parabola": {"learning_rate": 1e-5}, "rosenbrock": {"learning_rate": 1e-3}},
    demo_kwargs={"learning_rate": 1e-4, "warmup": 10},
    torch_bridge_class="ELRA",
    torch_state_keys=("x_lastgood", "g_old"),
    torch_reference="elra.ElraOptimizer",
    supports_complex=False,
    supports_schedules=False,  # learning_rate is only ELRA's initial step size
    description="ELRA P2M, MATH mode (steps by the adaptive alpha; elra 0.0.5 default)",
))

register(OptimizerEntry(
    name="elra_dnn",
    factory=elra,
    family="elra",
    kwargs={"classes": 10, "batch_size": 64},
    requires_value=True,
    hyperparams=("learning_rate", "weight_decay", "warmup", "momentum"),
    converge={"parabola": {"learning_rate": 1e-5}},
    demo_kwargs={"learning_rate": 1e-5},
    torch_bridge_class="ELRA",
    torch_state_keys=("x_lastgood", "g_old", "coll_grad"),
    torch_reference="elra.ElraOptimizer",
    supports_complex=False,
    supports_schedules=False,  # learning_rate is only ELRA's initial step size
    description="ELRA P2M, DNN mode (clipped lr, dynamic batch size; classes=10)",
))


# ------------------------------------------------------------------------------------------------
# EnhancedSGD family (enhanced_sgd.md)
# ------------------------------------------------------------------------------------------------


register(OptimizerEntry(
    name="enhanced_sgd",
    factory=enhanced_sgd,
    family="enhanced_sgd",
    # The loss drives the Q-learning controller and the spike handling; ``update`` also runs without it
    # (both are then skipped), but every consumer of the table should pass it.
    requires_value=True,
    hyperparams=("learning_rate", "momentum", "smoothing_factor", "noise_scale", "entropy_weight",
                 "loss_correction_factor", "retention_weight", "q_learning_rate", "q_discount",
                 "q_epsilon_decay", "q_epsilon_min", "lookahead_alpha"),
    # verified: both reach the target (atol 3e-2) in 10,000 steps with the defaults and seed 0
    converge={"parabola": {"learning_rate": 0.01}, "rosenbrock": {"learning_rate": 1e-3}},
    # Gradient centering keeps one output axis: flax kernels are (in, out), so the JAX row needs
    # centering_axis=-1 to centre per output unit as the torch rows do with their (out, in) default of 0.
    demo_kwargs={"learning_rate": 0.05, "momentum": 0.9, "centering_axis": -1},
    torch_demo_kwargs=_frozen({"lr": 0.05, "momentum": 0.9, "centering_axis": 0}),
    torch_bridge_class="EnhancedSGD",
    torch_state_keys=("momentum_buffer", "retained", "slow"),
    supports_complex=False,
    # Statistics (variance, entropy, clip level) are global over the unmasked leaves, so masking one leaf
    # legitimately changes the others' updates; masked leaves themselves are frozen exactly.
    supports_grad_mask=False,
    # segments=FlatLayout: the same segment operations as the pytree layout, bit-identical results
    supports_segments=True,
    stochastic=True,
    description="EnhancedSGD: SGD-momentum steered by a Q-learning controller, entropy, retention, lookahead",
))
