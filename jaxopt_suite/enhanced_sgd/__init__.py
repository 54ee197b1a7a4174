"""EnhancedSGD: SGD with momentum steered by a Q-learning controller (see :mod:`.transform`).

Blocks: :mod:`.entropy` (on-device gradient entropy), :mod:`.qlearning` (the controller as pure functions),
:mod:`.transform` (the optax transformation and the alias).
"""

from .entropy import gradient_entropy
from .qlearning import apply_action, discretize, epsilon_greedy, q_learning_update
from .transform import (
    EnhancedSGDState,
    bayesian_initialize,
    enhanced_sgd,
    find_enhanced_state,
    gaussian_noise,
    scale_by_enhanced_sgd,
    update_mix_prob,
)

__all__ = [
    "EnhancedSGDState",
    "apply_action",
    "bayesian_initialize",
    "discretize",
    "enhanced_sgd",
    "epsilon_greedy",
    "find_enhanced_state",
    "gaussian_noise",
    "gradient_entropy",
    "q_learning_update",
    "scale_by_enhanced_sgd",
    "update_mix_prob",
]
