"""The AutoSGM README problem for the tests (defined once in :mod:`parity.autosgm_readme`)."""

from parity.autosgm_readme import *  # noqa: F401,F403
from parity.autosgm_readme import (  # noqa: F401
    batches,
    data,
    full_loss,
    loss_and_grads,
    max_abs_diff,
    model,
    run_jax,
    run_jax_native,
    run_torch,
    x64_for,
)
