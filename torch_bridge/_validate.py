"""torch.optim's constructor checks, with torch's messages (run before ``Optimizer.__init__``)."""

from __future__ import annotations

import warnings

import torch


def scalar(value):
    """A Python float from a float or a 1-element tensor."""
    return float(value) if torch.is_tensor(value) else value


def check_lr(lr, *, foreach=None, capturable=False) -> None:
    if torch.is_tensor(lr):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_eps(eps) -> None:
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")


def check_betas(betas) -> tuple:
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    both_float = isinstance(betas[0], float) and isinstance(betas[1], float)
    both_tensor = torch.is_tensor(betas[0]) and torch.is_tensor(betas[1])
    if not (both_float or both_tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    return tuple(betas)


def check_weight_decay(weight_decay) -> None:
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_momentum(momentum) -> None:
    if momentum < 0.0:
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
