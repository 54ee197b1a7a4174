"""The compiled steps and state initialisations of the bridge, shared by every instance.

:class:`StepSpec` is everything static about one compiled step (registry entry, structural kwargs, flat
layout); :func:`_compiled_step` / :func:`_compiled_init` are jitted once per spec and shared across optimizer
instances and classes (ELRA and EnhancedSGD register their own jitted functions in ``_STEP_FUNCTIONS`` /
``_INIT_FUNCTIONS``, which :func:`compiled_step_cache_size` / :func:`compiled_init_cache_size` count). See the
module docstring of :mod:`torch_bridge.optimizer` for the execution model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Hashable, Mapping, Optional

import jax

from jaxopt_suite import registry
from jaxopt_suite._common import FlatLayout
from jaxopt_suite.nonfinite import EXTERNAL_FLAG, skip_nonfinite

__all__ = ["StepSpec", "compiled_init_cache_size", "compiled_step_cache_size", "entry_info"]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a compiled step: registry entry, structural kwargs and flat layout."""

    entry: Any  # a registry name, or a hashable factory callable (kwargs -> transformation)
    static: tuple[tuple[str, Hashable], ...]
    segments: Optional[FlatLayout] = None

    def transformation(self, hyper: Mapping[str, Any]):
        build = registry.get(self.entry).build if isinstance(self.entry, str) else self.entry
        kwargs = dict(self.static)
        # the non-finite policy wraps whatever the entry builds (a registry factory, Lookahead's or
        # AutoSGM's bridge factory): "skip" here, "raise" is checked in torch by JaxOptimizer.step
        policy = kwargs.pop("nonfinite", "propagate")
        kwargs.update(hyper)
        if self.segments is not None:
            kwargs["segments"] = self.segments
        tx = build(**kwargs)
        if policy == "skip":
            tx = skip_nonfinite(tx, segments=self.segments, check_value=entry_info(self.entry)[0])
        return tx


def entry_info(entry) -> tuple[bool, bool]:
    """``(requires_value, supports_segments)`` of a registry name or a factory callable.

    A factory callable may carry ``requires_value`` / ``supports_segments`` attributes (default False/True).
    """
    if isinstance(entry, str):
        e = registry.get(entry)
        return e.requires_value, e.supports_segments
    return bool(getattr(entry, "requires_value", False)), bool(getattr(entry, "supports_segments", True))


@functools.partial(jax.jit, static_argnames=("spec",))
def _compiled_init(params, hyper, *, spec: StepSpec):
    return spec.transformation(hyper).init(params)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0, 1), keep_unused=True)
def _compiled_step(scratch, state, params, grads, hyper, grad_mask, value, flag=None, *, spec: StepSpec):
    # ``scratch`` is unused on purpose: it is donated so that the new params reuse its memory.
    del scratch
    extra = {}
    if grad_mask is not None:
        extra["grad_mask"] = grad_mask
    if value is not None:
        extra["value"] = value
    if flag is not None:  # nonfinite="skip" over several compiled steps: the decision made over all of them
        extra[EXTERNAL_FLAG] = flag
    updates, new_state = spec.transformation(hyper).update(grads, state, params, **extra)
    new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    return new_params, new_state


# the jitted steps and inits of every bridge class (ELRA and EnhancedSGD register their own)
_STEP_FUNCTIONS = [_compiled_step]
_INIT_FUNCTIONS = [_compiled_init]


def compiled_step_cache_size() -> int:
    """Number of compiled step executables of all bridge classes (all instances share them); tests count
    recompiles with it: instances that differ only in numeric hyperparameters (or a seed) add none."""
    return sum(f._cache_size() for f in _STEP_FUNCTIONS)


def compiled_init_cache_size() -> int:
    """Number of compiled state initialisations of all bridge classes (shared like the steps)."""
    return sum(f._cache_size() for f in _INIT_FUNCTIONS)
