"""AutoSGM: lowpass-filter momentum, moment and parcor learning rates, and windows (learning-rate schedules).

Modules: :mod:`.filters` (the first-order lowpass filter), :mod:`.windows` (the window schedules),
:mod:`.autosgm` (the transformation and the reference-tuple constructor).
"""

from .autosgm import (
    AutoSGMState,
    autosgm,
    autosgm_from_config,
    config_from_tuples,
    scale_by_autosgm,
)
from .filters import lowpass
from .windows import autosgm_window, kronecker_positions

__all__ = [
    "AutoSGMState",
    "autosgm",
    "autosgm_from_config",
    "autosgm_window",
    "config_from_tuples",
    "kronecker_positions",
    "lowpass",
    "scale_by_autosgm",
]
