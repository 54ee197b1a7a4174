"""PyTorch optimizers backed by jaxopt-suite's JAX transformations (zero-copy through DLPack).

Every class is a real ``torch.optim.Optimizer``: param groups, schedulers, closures, hooks, GradScaler
and torch-format ``state_dict``. See :mod:`torch_bridge.optimizer` for the execution model.
"""

from .adam import Adam, AdamW
from .elra import ELRA, ElraGradScaler, ElraOptimizer
from .optimizer import JaxOptimizer, compiled_step_cache_size
from .sgd import SGD

__all__ = ["JaxOptimizer", "SGD", "Adam", "AdamW", "ELRA", "ElraOptimizer", "ElraGradScaler",
           "compiled_step_cache_size"]
