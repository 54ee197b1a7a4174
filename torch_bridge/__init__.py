"""PyTorch optimizers backed by jaxopt-suite's JAX transformations (zero-copy through DLPack).

Every class is a real ``torch.optim.Optimizer``: param groups, schedulers, closures, hooks, GradScaler
and torch-format ``state_dict``. See :mod:`torch_bridge.optimizer` for the execution model and for how
to write a new class.
"""

try:
    import torch  # noqa: F401
except ModuleNotFoundError as exc:  # the bridge is an optional part of the distribution
    raise ModuleNotFoundError(
        "torch_bridge needs PyTorch, which is not installed: install your torch build (>= 2.13), "
        "or `pip install 'jaxopt-suite[torch]'`", name="torch") from exc

# before anything initialises a JAX backend: JAX must not preallocate 75% of the GPU that torch uses (unless the
# user chose a policy with an XLA_PYTHON_CLIENT_* variable); warns once if it is too late (docs/gpu.md)
from ._cuda import configure_jax_memory as _configure_jax_memory

_configure_jax_memory()

from .adam import Adam, AdamW
from .adopt import ADOPT
from .asgd import ASGD
from .autosgm import AutoSGM
from .elra import ELRA, ElraGradScaler, ElraOptimizer
from .enhanced_sgd import EnhancedSGD
from .lookahead import Lookahead, TorchLookahead
from .optimizer import JaxOptimizer, compiled_init_cache_size, compiled_step_cache_size
from .sgd import SGD

__all__ = ["JaxOptimizer", "SGD", "Adam", "AdamW", "ADOPT", "ASGD", "AutoSGM", "ELRA", "ElraOptimizer",
           "ElraGradScaler", "EnhancedSGD", "Lookahead", "TorchLookahead",
           "compiled_init_cache_size", "compiled_step_cache_size"]
