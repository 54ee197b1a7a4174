"""Shared timing protocol of the benchmarks: variants interleaved in one run, median after warm-up.

Timings on a shared machine drift with the load of other processes, so absolute times mean little and
comparisons between separate runs even less. Every benchmark therefore runs all of its variants in one
process, alternating them round by round (forward order, then reverse, so no variant always runs right
after another), and reports medians and their ratios::

    from benchmarks._timing import interleaved_median, ratio_table

    timings = interleaved_median({"optax": step_optax, "suite": step_suite}, warmup=5, rounds=40)
    print(ratio_table(timings, baseline="optax"))

A variant is a zero-argument callable doing one step; whatever it returns is passed to ``sync`` (by default
``jax.block_until_ready`` when JAX is importable) before the clock stops, so asynchronous dispatch is
timed to completion. Never assert absolute times in tests.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call seconds of one variant (after warm-up)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def q25(self) -> float:
        return float(np.percentile(self.samples, 25))

    @property
    def q75(self) -> float:
        return float(np.percentile(self.samples, 75))

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25


def _default_sync(result: Any) -> Any:
    try:
        import jax
    except ImportError:
        return result
    return jax.block_until_ready(result)


def interleaved_median(
    variants: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 5,
    rounds: int = 40,
    repeat: int = 1,
    sync: Optional[Callable[[Any], Any]] = None,
) -> dict[str, Timing]:
    """Time each variant ``rounds`` times, interleaved, after ``warmup`` untimed calls of each.

    Round ``r`` runs the variants in order for even ``r`` and in reverse for odd ``r``. Each sample is the
    mean of ``repeat`` back-to-back calls (use ``repeat > 1`` for calls much shorter than the timer's
    resolution). Returns the samples per variant; :attr:`Timing.median` is the figure to compare.
    """
    sync = _default_sync if sync is None else sync
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            sync(variants[name]())
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(repeat):
                out = fn()
            sync(out)
            samples[name].append((time.perf_counter() - start) / repeat)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def ratio_table(timings: Mapping[str, Timing], baseline: str, *, unit: float = 1e-3, unit_name: str = "ms") -> str:
    """A plain-text table: median, IQR and the ratio of medians to ``baseline`` per variant."""
    base = timings[baseline].median
    width = max(len(n) for n in timings)
    lines = [f"{'variant':<{width}}  {'median ' + unit_name:>12}  {'IQR ' + unit_name:>10}  {'× ' + baseline:>10}"]
    for name, t in timings.items():
        lines.append(f"{name:<{width}}  {t.median / unit:12.3f}  {t.iqr / unit:10.3f}  {t.median / base:10.3f}")
    return "\n".join(lines)


def machine_line() -> str:
    """Cores available to this process and the load average: context for reading the ratios."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return f"cores available: {cores}; load average (1/5/15 min): {load}"
