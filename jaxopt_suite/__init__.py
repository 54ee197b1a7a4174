"""jaxopt-suite: deep-learning optimizers written once in JAX (optax transformations).

The public surface re-exports the factories, their building blocks and states; see each module's
docstring for the update rule and references, and :mod:`jaxopt_suite.registry` for the table of
optimizers that tests, the torch bridge and the demo read.
"""

from ._common import FlatLayout, get_hyperparams, inject_hyperparams, zero_masked
from .adam import (
    AdamState,
    DecoupledDecayState,
    adam,
    adamw,
    apply_decoupled_weight_decay,
    scale_by_adam,
)
from .autosgm import (
    AutoSGMState,
    autosgm,
    autosgm_from_config,
    autosgm_window,
    kronecker_positions,
    scale_by_autosgm,
)
from .adopt import ADOPTState, adopt, default_clip_value, scale_by_adopt
from .asgd import ASGDState, asgd, asgd_averaged_params, scale_by_asgd
from .enhanced_sgd import EnhancedSGDState, enhanced_sgd, scale_by_enhanced_sgd
from .lookahead import LookaheadState, lookahead, lookahead_adam, lookahead_sgd, lookahead_slow_params
from .elra import (
    ElraBoostState,
    ElraState,
    elra,
    elra_boost_init,
    elra_boost_result,
    elra_boost_update,
    elra_next_call_is_real_step,
    elra_step,
    scale_by_elra,
)
from .sgd import SGDState, scale_by_sgd_momentum, sgd
from .nonfinite import NONFINITE_POLICIES, SkipNonFiniteState, raise_nonfinite, skip_nonfinite
from . import registry

__all__ = [
    "FlatLayout",
    "get_hyperparams",
    "inject_hyperparams",
    "zero_masked",
    "AdamState",
    "DecoupledDecayState",
    "apply_decoupled_weight_decay",
    "adam",
    "adamw",
    "scale_by_adam",
    "AutoSGMState",
    "autosgm",
    "autosgm_from_config",
    "autosgm_window",
    "kronecker_positions",
    "scale_by_autosgm",
    "ADOPTState",
    "adopt",
    "default_clip_value",
    "scale_by_adopt",
    "ASGDState",
    "asgd",
    "asgd_averaged_params",
    "scale_by_asgd",
    "EnhancedSGDState",
    "enhanced_sgd",
    "scale_by_enhanced_sgd",
    "LookaheadState",
    "lookahead",
    "lookahead_adam",
    "lookahead_sgd",
    "lookahead_slow_params",
    "ElraBoostState",
    "ElraState",
    "elra",
    "elra_boost_init",
    "elra_boost_result",
    "elra_boost_update",
    "elra_next_call_is_real_step",
    "elra_step",
    "scale_by_elra",
    "SGDState",
    "scale_by_sgd_momentum",
    "sgd",
    "NONFINITE_POLICIES",
    "SkipNonFiniteState",
    "raise_nonfinite",
    "skip_nonfinite",
    "registry",
]
