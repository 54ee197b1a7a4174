"""Teacher-forced parity with the AutoSGM reference implementation (kept outside this repository).

The reference (github.com/somefunAgba/autosgm, ``asgm.py``) has no licence, so it is never vendored: set
the environment variable ``AUTOSGM_REFERENCE`` to the directory of a checkout (the one holding ``asgm.py``)
and :func:`load_reference` imports it from there. :data:`UPSTREAM_CASES` are the configurations where the
reference agrees with its README (see the project's AutoSGM specification); :func:`teacher_forced` feeds the
reference's own gradients to both sides on the README problem and returns the largest parameter difference.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

ENV_VAR = "AUTOSGM_REFERENCE"
DEFAULT_BETAS = (0.9999, 0.999, 0.9, 0.0, 0.0, True)

# name: (reference kwargs, our kwargs for autosgm_from_config or None when identical)
UPSTREAM_CASES: dict[str, tuple[Mapping[str, Any], Optional[Mapping[str, Any]]]] = {
    "a": (dict(lr_cfg=(True, 1e-2, 3), beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True),
               rc_cfg=(1, 0, 0, 2, 1, 1, 300, 1, 0), wd_cfg=(0, 1), eps_cfg=(1e-10,)), None),
    "b": (dict(lr_cfg=(False, 1e-2, 0), beta_cfg=(0.9999, 0.999, 0.9, 0, 1, False), wd_cfg=(0, 0),
               eps_cfg=(1e-10,)), None),
    "c": (dict(lr_cfg=(True, 1e-3, 0), beta_cfg=(0.9999, 0.999, 0.9, 0.9 / 1.9, 0, True),
               rc_cfg=(1, 0, 0, 2, 1, 1, 30, 1, 0), wd_cfg=(1e-2, 1), eps_cfg=(1e-8,)), None),
    "d": (dict(lr_cfg=(True, 1e-2, 1), beta_cfg=(0.9999, 0.999, 0.9, 0.55, 0, True),
               rc_cfg=(2, 0, 0.1, 1, 0, 1, 40, 1, 0), wd_cfg=(1e-3, 0), eps_cfg=(1e-10,)), None),
    "e": (dict(lr_cfg=(True, 1e-2, 2), beta_cfg=(0.9999, 0.999, 0.9, 0.55, 0, True),
               rc_cfg=(3, 0, 0, 0.5, 1, 1, 25, 1, 0), wd_cfg=(1e-2, 1), eps_cfg=(1e-10,)), None),
    "f": (dict(lr_cfg=(True, 1e-2, 1), beta_cfg=DEFAULT_BETAS, rc_cfg=(5, 0, 0, 4, 0, 1, 30, 1, 0.3),
               wd_cfg=(0, 0), eps_cfg=(1e-10,)), None),
    "g": (dict(lr_cfg=(True, 1e-3, 0), beta_cfg=DEFAULT_BETAS, rc_cfg=(1, 0, 0, 2, 1, 1, 45, 3, 0)), None),
    "h": (dict(lr_cfg=(True, 1e-3, 0), beta_cfg=DEFAULT_BETAS, rc_cfg=(5, 0, 0, 4, 1, 1, 45, 3, 0)), None),
    "i": (dict(lr_cfg=(True, 1e-3, 0), beta_cfg=DEFAULT_BETAS, rc_cfg=(1, 0, 0, 2, 1, 3, 15, 2, 0)), None),
    # the reference's Huberised step is spelled lr_cfg[0] == 4; ours is num_lrc = 4
    "j": (dict(lr_cfg=(4, 1e-3, 0), beta_cfg=DEFAULT_BETAS, eps_cfg=(1e-8,)),
          dict(lr_cfg=(True, 1e-3, 4), beta_cfg=DEFAULT_BETAS, eps_cfg=(1e-8,))),
    "k": (dict(lr_cfg=(False, 1e-2, 0), beta_cfg=(0.9999, 0.999, 0, 0, 0, True), wd_cfg=(1e-2, 1)), None),
    "l": (dict(lr_cfg=(True, 1e-2, 3), beta_cfg=(0.9999, 0.999, 0.9, 0.3, 0, True),
               rc_cfg=(4, 0, 0.05, 2, 1, 1, 20, 1, 0.2), wd_cfg=(1e-2, 1)), None),
}


def reference_path() -> Optional[Path]:
    """The directory named by ``AUTOSGM_REFERENCE`` when it holds ``asgm.py``, else None."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value)
    return path if (path / "asgm.py").is_file() else None


def load_reference():
    """The reference module ``asgm`` imported from ``AUTOSGM_REFERENCE``, or None when unavailable."""
    path = reference_path()
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("autosgm_reference_asgm", path / "asgm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def teacher_forced(asgm, reference_kwargs, our_kwargs=None, steps: int = 50, dtype=None, prepare=None) -> float:
    """Max |Δp| over ``steps`` when the reference's gradients drive both the reference and ours.

    ``prepare(net)`` may edit the initial model (e.g. zero a bias) before either optimizer sees it.
    """
    import jax
    import jax.numpy as jnp
    import torch

    from jaxopt_suite.autosgm import autosgm_from_config

    from . import autosgm_readme as R

    dtype = dtype or torch.float64
    x, y = R.data(dtype)
    net = R.model(dtype)
    if prepare is not None:
        import torch as _torch

        with _torch.no_grad():
            prepare(net)
    opt = asgm.AutoSGM(net.parameters(), **reference_kwargs)
    tx = autosgm_from_config(**(our_kwargs or reference_kwargs))
    worst = 0.0
    with R.x64_for(dtype):
        params = {k: jnp.asarray(v.detach().numpy()) for k, v in net.named_parameters()}
        state = tx.init(params)
        update = jax.jit(tx.update)
        for idx in R.batches(steps):
            R.loss_and_grads(net, x, y, idx)
            grads = {k: jnp.asarray(p.grad.numpy()) for k, p in net.named_parameters()}
            opt.step()
            updates, state = update(grads, state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
            for k, p in net.named_parameters():
                diff = np.max(np.abs(np.asarray(params[k], np.float64) - p.detach().double().numpy()))
                worst = max(worst, float(diff))
    return worst
