"""Parity rows for EnhancedSGD (``jaxopt_suite.enhanced_sgd``).

* ``enhanced_sgd_frozen_controller_vs_restated_*``: the gradient path with the Q-controller frozen
  (``q_learning_rate = 0``, ``q_epsilon = q_epsilon_min = 0``: the greedy action on an all-zero table is the no-op), noise,
  retention and lookahead off, centering ``'all'``, against an independent torch re-statement of the formulas
  (variance → smoothed variance with the stabiliser against the previous valued step → clip level; whole-tensor
  centering, clipping, heavy-ball momentum). The known-wrong variant drops the centering.
* ``enhanced_sgd_full_vs_bridge_*``: every feature on (controller, noise, retention, centering, clipping,
  lookahead) with the same seed, ours against ``torch_bridge.EnhancedSGD`` fed the same loss at every step.
  The known-wrong variant uses another seed (different noise and exploration).
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

import numpy as np

from . import problems as P
from .references import Reference, Side, TorchReference
from .runner import ParityCase

FROZEN = dict(learning_rate=0.05, momentum=0.9, smoothing_factor=0.1, apply_noise=False, gradient_retention=False,
              gradient_centering="all", gradient_clipping=True, lookahead_k=0, q_learning_rate=0.0, q_epsilon=0.0,
              q_epsilon_min=0.0)
FULL = dict(learning_rate=0.05, momentum=0.9, lookahead_k=3, noise_scale=1e-3, seed=3)


class RestatedFrozenEnhancedSGD:
    """torch re-statement of EnhancedSGD's gradient path with a frozen controller (one loss per step)."""

    def __init__(self, params, lr, momentum, smoothing_factor, centering=True):
        import torch

        self.params = list(params)
        self.lr, self.momentum, self.sf, self.centering = lr, momentum, smoothing_factor, centering
        self.grad_var = 0.0
        self.prev_grad_var = 0.0  # the smoothed variance at the previous valued step
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.state = {}

    def step(self):
        import torch

        with torch.no_grad():
            flat = torch.cat([p.grad.reshape(-1) for p in self.params]).double()
            v = float(flat.var())  # unbiased
            gv = self.sf * v + (1 - self.sf) * self.grad_var
            if abs(gv - self.prev_grad_var) > 0.9:
                gv = self.prev_grad_var * 0.9 + (1 - 0.9) * gv
            self.grad_var = self.prev_grad_var = gv
            clip = min(max(2 * math.sqrt(gv), 0.5), 10.0)
            for p, buf in zip(self.params, self.buffers):
                g = p.grad
                if self.centering and g.numel() > 1:
                    g = g - g.mean()
                if gv > 0:
                    g = g.clamp(-clip, clip)
                buf.mul_(self.momentum).add_(g)
                p.add_(buf, alpha=-self.lr)


def restated(centering=True) -> TorchReference:
    def build(params):
        return RestatedFrozenEnhancedSGD(params, FROZEN["learning_rate"], FROZEN["momentum"],
                                         FROZEN["smoothing_factor"], centering=centering)

    name = "torch re-statement (frozen controller)" + ("" if centering else " without centering [wrong]")
    return TorchReference(name=name, kwargs=MappingProxyType({}), build=build)


class _BridgeSide(Side):
    """``torch_bridge.EnhancedSGD`` on torch params (sorted by name, as JAX orders dict leaves), given the loss."""

    framework = "torch"

    def __init__(self, label, params, dtype, kwargs):
        from torch_bridge import EnhancedSGD

        self.label = label
        self._params = {k: v.requires_grad_(True) for k, v in sorted(P.as_torch(params, dtype).items())}
        options = dict(kwargs)
        lr = options.pop("learning_rate")
        self._opt = EnhancedSGD(list(self._params.values()), lr=lr, **options)

    def params(self):
        return self._params

    def step(self, grads, value=None):
        import torch

        for k, p in self._params.items():
            p.grad = grads[k].detach().clone()
        self._opt.step(value=None if value is None else torch.as_tensor(value))

    def observe(self):
        return P.to_numpy(self._params)

    @property
    def state(self):
        return self._opt


@dataclasses.dataclass(frozen=True)
class BridgeReference(Reference):
    """``torch_bridge.EnhancedSGD`` with ``kwargs`` (our factory's names; ``learning_rate`` becomes ``lr``)."""

    @property
    def framework(self) -> str:
        return "torch"

    def make(self, params, dtype):
        return _BridgeSide(self.name, params, dtype, self.kwargs)


def _bridge(**overrides) -> BridgeReference:
    name = "torch_bridge.EnhancedSGD"
    if overrides:
        name += f"({', '.join(f'{k}={v}' for k, v in overrides.items())}) [wrong]"
    return BridgeReference(name=name, kwargs=MappingProxyType({**FULL, **overrides}))


def cases() -> list[ParityCase]:
    out = []
    for problem, steps in (("mlp", 100), ("digits_mlp", 60)):
        for dtype in ("float64", "float32"):
            out.append(ParityCase(
                name=f"enhanced_sgd_frozen_controller_vs_restated_{problem}_f{dtype[-2:]}",
                entry="enhanced_sgd", kwargs=FROZEN, reference=restated(), problem=problem, dtype=dtype,
                steps=steps, wrong=restated(centering=False),
                note="variance, stabiliser, clip level, whole-tensor centering, clipping, momentum",
            ))
    for problem, steps in (("mlp", 40), ("digits_mlp", 30)):
        out.append(ParityCase(
            name=f"enhanced_sgd_full_vs_bridge_{problem}_f32", entry="enhanced_sgd", kwargs=FULL,
            # the controller and the per-leaf noise turn last-ulp differences of the two layouts into
            # ~1.5e-6 relative over 40 steps: the error model's δ is taken on max_rel
            reference=_bridge(), problem=problem, dtype="float32", steps=steps, measure="rel",
            wrong=_bridge(seed=4), wrong_factor=10.0,
            note="controller, noise, retention, centering, clipping and lookahead, same seed",
        ))
    return out
