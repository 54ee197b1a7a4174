"""Constructor checks of the bridge classes.

Two layers, in this order:

1. **torch.optim's own checks, with torch's messages and precedence** (``check_lr``, ``check_eps``,
   ``check_betas``...), run by each named class before ``Optimizer.__init__``. Where torch would fail with
   an unhelpful ``TypeError`` from a comparison (``lr="0.1"``, ``lr=None``: "'<=' not supported between
   instances of 'float' and 'str'"), a ``TypeError`` naming the argument is raised at the same point.
2. **the suite's stricter checks** (:func:`check_group`, run by ``JaxOptimizer.add_param_group`` for every
   param group, at construction and for groups added later), after torch's: every numeric option must be
   a real number or a 1-element tensor and finite (torch.optim accepts ``lr=inf``, ``momentum=nan``,
   ``weight_decay=inf``, ``lr=True``); every flag must be a bool (torch reads ``maximize="no"`` as True);
   then the registry factory of the group builds its transformation once, which applies the JAX
   factory's own range checks (``jaxopt_suite._common.check_range``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from jaxopt_suite._common import HyperparameterTypeError

#: flags torch declares ``Optional[bool]`` (``None``: let torch choose)
OPTIONAL_FLAGS = ("foreach", "fused")


def scalar(value):
    """A Python float from a float or a 1-element tensor."""
    return float(value) if torch.is_tensor(value) else value


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_number(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` must be a real number or a 1-element real tensor (``None`` too when ``optional``).

    ``HyperparameterTypeError`` (a ``TypeError``) naming ``name`` otherwise. Bools are numbers here, as
    in torch's comparisons; :func:`check_strict` rejects them after torch's own checks.
    """
    if value is None:
        if optional:
            return
        raise HyperparameterTypeError(f"{name} must be a real number or a 1-element tensor, got None")
    if torch.is_tensor(value):
        if value.is_complex() or value.dtype == torch.bool:
            raise HyperparameterTypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        return
    if not isinstance(value, numbers.Real):
        raise HyperparameterTypeError(f"{name} must be a real number or a 1-element tensor, got {_describe(value)}")


def check_strict(name: str, value: Any, label: str = None, *, optional: bool = False) -> None:
    """The bridge's checks stricter than torch.optim, run after torch's: no bools, no NaN, no ±inf.

    ``label`` is the start of torch's message for the argument ("Invalid learning rate"); the message names
    the argument too.
    """
    check_number(name, value, optional=optional)
    if value is None:
        return
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        number = float(value)
    elif isinstance(value, (bool, np.bool_)):
        raise HyperparameterTypeError(f"{name} must be a real number, got the bool {value!r}")
    else:
        number = float(value)
    if not math.isfinite(number):
        what = label or f"Invalid {name}"
        raise ValueError(f"{what}: {value}; {name} must be finite (torch.optim accepts {value}, torch_bridge "
                         "rejects it: no step of the optimizer means anything with it)")


def check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    """A flag must be a bool (``None`` too when ``optional``): ``bool("no")`` is True, so no truthiness."""
    if optional and value is None:
        return
    if not isinstance(value, (bool, np.bool_)):
        allowed = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be a bool ({allowed}), got {_describe(value)}")


# ---- torch.optim's checks (torch's messages and order) ------------------------------------------------

def check_lr(lr, *, foreach=None, capturable=False, sgd=False) -> None:
    """torch's lr checks; ``sgd=True``: torch.optim.SGD's form ``lr < 0`` (which lets NaN through to
    :func:`check_strict`) instead of ``not 0 <= lr``."""
    if torch.is_tensor(lr):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    check_number("lr", lr)
    if (lr < 0.0) if sgd else not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_eps(eps) -> None:
    check_number("eps", eps)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")


def check_beta(betas, index: int) -> None:
    """torch's ``0 <= betas[index] < 1`` (Adam's and ADOPT's message)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise HyperparameterTypeError(f"betas must be a pair (beta1, beta2), got {_describe(betas)}")
    check_number(f"betas[{index}]", betas[index])
    if not 0.0 <= betas[index] < 1.0:
        raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")


def check_beta_kinds(betas, *, foreach=None, capturable=False) -> tuple:
    """torch.optim.Adam's betas checks after the ranges (and after weight_decay's): kinds, then the
    tensor-specific rules (a tensor beta with foreach=True needs capturable=True; 1-element)."""
    both_float = isinstance(betas[0], float) and isinstance(betas[1], float)
    both_tensor = torch.is_tensor(betas[0]) and torch.is_tensor(betas[1])
    if not (both_float or both_tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i in (0, 1):
        if torch.is_tensor(betas[i]):
            if not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if betas[i].numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
    return tuple(betas)


def check_weight_decay(weight_decay, *, sgd=False) -> None:
    check_number("weight_decay", weight_decay)
    if (weight_decay < 0.0) if sgd else not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_momentum(momentum, *, optional: bool = False) -> None:
    check_number("momentum", momentum, optional=optional)
    if momentum is not None and momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")


def check_flags(*, foreach=None, fused=None, differentiable=False) -> None:
    """Implementation flags are accepted and ignored numerically; keep torch's incompatibility errors."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        warnings.warn("torch_bridge optimizers are not differentiable; differentiable=True is ignored.",
                      stacklevel=3)


# ---- the stricter layer, per param group -------------------------------------------------------------

#: the start of torch's messages for common keys
_LABELS = {"lr": "Invalid learning rate", "eps": "Invalid epsilon value", "weight_decay": "Invalid weight_decay value",
           "momentum": "Invalid momentum value"}


def _is_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))) or torch.is_tensor(value)


def check_group(group: Mapping[str, Any], kinds: Mapping[str, Any], optional_numbers=()) -> None:
    """Type, range and finiteness checks of one param group, after torch's (see the module docstring).

    ``kinds`` gives, per group key, the default whose kind the value must have: a bool (a flag), a real
    number or tensor (a finite number), a tuple of numbers (a tuple of finite numbers of that length); keys
    with other defaults (strings, callables, ``None``) are left to the factory. ``optional_numbers``:
    numeric keys whose ``None`` means something (the generic SGD's ``momentum``: no buffer).
    """
    for key, value in group.items():
        if key == "params" or key not in kinds:
            continue
        default = kinds[key]
        if key in OPTIONAL_FLAGS:
            check_flag(key, value, optional=True)
        elif isinstance(default, (bool, np.bool_)):
            check_flag(key, value)
        elif _is_number(default) or (default is None and key in optional_numbers):
            check_number(key, value, optional=key in optional_numbers)
        elif (isinstance(default, tuple) and default and all(_is_number(d) for d in default)):
            # only the entries the default has: AutoSGM's eps_cfg may carry extras (ignored, with a warning)
            if not isinstance(value, (tuple, list)) or len(value) < len(default):
                raise HyperparameterTypeError(f"{key} must be a tuple of {len(default)} numbers, got "
                                              f"{_describe(value)}")
            for i, v in enumerate(value[:len(default)]):
                check_number(f"{key}[{i}]", v)
    # torch's range checks with torch's messages, for the keys named as torch names them
    # (in the `x < 0` form: NaN is left to the finiteness check below, whose message says why)
    if "lr" in group and "lr" in kinds:
        check_lr(group["lr"], sgd=True)
    if "eps" in group and _is_number(kinds.get("eps")):
        check_eps(group["eps"])
    if isinstance(kinds.get("betas"), tuple) and "betas" in group:
        check_beta(group["betas"], 0)
        check_beta(group["betas"], 1)
    if "weight_decay" in group and _is_number(kinds.get("weight_decay")):
        check_weight_decay(group["weight_decay"], sgd=True)
    if "momentum" in group and ("momentum" in optional_numbers or _is_number(kinds.get("momentum"))):
        check_momentum(group["momentum"], optional="momentum" in optional_numbers)
    # finiteness, stricter than torch
    for key, value in group.items():
        if key == "params" or key not in kinds or key in OPTIONAL_FLAGS:
            continue
        default = kinds[key]
        if _is_number(default) or (default is None and key in optional_numbers):
            check_strict(key, value, _LABELS.get(key), optional=key in optional_numbers)
        elif isinstance(default, tuple) and default and all(_is_number(d) for d in default):
            for i, v in enumerate(value[:len(default)]):
                check_strict(f"{key}[{i}]", v)
