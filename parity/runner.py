"""Parity cases, the runner that drives them, and case discovery.

A :class:`ParityCase` names one of our registry entries (with kwargs), one reference, a problem, a dtype,
a number of steps and a tolerance. :func:`run_case` builds both sides on the problem's initial params and
steps each of them; at every step a side computes its own gradient from its own params (numpy float64 for
``quad``/``rosenbrock``, its framework's autograd for the MLPs), so the sides never exchange anything and
run one after the other. After every step the observed quantities (params, plus extras such as averaged
weights) are recorded, and the trajectories are compared:

* ``max_abs`` = max over steps, leaves and elements of ``|ours − reference|``;
* ``max_rel`` = max over steps and leaves of ``max|ours − reference| / max|reference|``.

A case passes when ``max_abs <= atol`` and ``max_rel <= rtol`` (a ``None`` tolerance is not checked).
An optional known-wrong variant (``wrong``) must be more than ``wrong_factor`` × ``atol`` (or × ``rtol``
when there is no ``atol``) away from ours: that shows the comparison can fail.

Cases live in per-family modules ``parity/cases_<family>.py``, each exposing ``CASES`` (a list) or
``cases()``; :func:`discover` imports them all. float64 cases run inside ``jax.enable_x64(True)``, so
float32 and float64 cases share one process.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from . import problems as P
from .references import Reference, suite

_TINY = 1e-30
_PERTURB_SEED = 20240607
ROUNDING_ULPS = 8.0


@dataclasses.dataclass(frozen=True)
class ParityCase:
    """One row of the parity table.

    Attributes:
      name: unique case name (``"sgd_dampening_quad_f64"``...).
      entry: our registry entry name.
      kwargs: kwargs for the entry (a mapping, or a callable returning one, evaluated at run time).
      reference: the reference to compare with.
      problem: problem name (:mod:`parity.problems`).
      dtype: ``"float32"`` or ``"float64"``.
      steps: number of optimizer steps.
      ulps: the error model's K (see :func:`rounding_response`): the tolerance is K × δ, δ the response
        of our trajectory to one rounding error per element per step. Default :data:`ROUNDING_ULPS`.
      measure: ``"abs"`` (the model bounds ``max_abs``) or ``"rel"`` (``max_rel``: for trajectories whose
        scale spans orders of magnitude).
      atol, rtol: a declared tolerance on ``max_abs`` / ``max_rel`` instead of the model, for a difference
        that is not rounding (``tolerance_reason`` must say what it is and where the bound comes from).
      wrong: a known-wrong variant that must be far from ours (sensitivity), or ``None``.
      wrong_factor: how far (in multiples of the tolerance) ``wrong`` must be.
      extras: ``(state, params) -> {what: {param: array}}`` state quantities of ours to compare with the
        reference's ``"<what>:<param>"`` observations (e.g. ASGD's ``ax``).
      none_grads: ``{step: (param names,)}`` — those params get a ``None`` gradient at that (0-based) step.
      check: optional ``(result) -> None`` raising ``AssertionError`` for case-specific properties (e.g.
        "clipping fired"); it sees the full trajectories.
      requires: extra registry entries the case needs (besides ``entry``).
      bridge_kwargs: torch-style constructor kwargs of the entry's ``torch_bridge_class``; when given,
        discovery adds the same comparison with our side run through the torch bridge (flat and simple
        paths), as cases named ``<name>@bridge_flat`` / ``<name>@bridge_simple``.
      backend: which of our implementations is compared: ``"jax"`` (the registry entry as a jitted JAX
        step), ``"bridge_flat"`` or ``"bridge_simple"`` (set by discovery).
      slow: excluded from the default test run (pytest ``-m 'not slow'``); ``python -m parity`` runs it.
      known_issue: non-empty when the case is known to fail (the text says why); it is then reported as
        ``XFAIL``, and as ``XPASS`` (an error) once it passes, so the marker gets removed.
      family: the case module's family (filled in by discovery).
      note: one line shown with ``--list``.
    """

    name: str
    entry: str
    kwargs: Any
    reference: Reference
    problem: str
    dtype: str
    steps: int = 100
    atol: Optional[float] = None
    rtol: Optional[float] = None
    tolerance_reason: str = ""
    ulps: float = ROUNDING_ULPS
    measure: str = "abs"
    wrong: Optional[Reference] = None
    wrong_factor: float = 10.0
    extras: Optional[Callable[[Any, Any], Mapping[str, Mapping[str, Any]]]] = None
    none_grads: Mapping[int, tuple[str, ...]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    check: Optional[Callable[["ParityResult"], None]] = None
    requires: tuple[str, ...] = ()
    bridge_kwargs: Optional[Mapping[str, Any]] = None
    backend: str = "jax"
    slow: bool = False
    known_issue: str = ""
    family: str = ""
    note: str = ""

    def __post_init__(self):
        if (self.atol is not None or self.rtol is not None) and not self.tolerance_reason:
            raise ValueError(f"case {self.name!r}: a declared atol/rtol needs a tolerance_reason (else the "
                             f"error model sets the tolerance)")
        if self.measure not in ("abs", "rel"):
            raise ValueError(f"case {self.name!r}: measure must be 'abs' or 'rel', got {self.measure!r}")
        if not self.ulps > 0:
            raise ValueError(f"case {self.name!r}: ulps must be > 0, got {self.ulps!r}")
        if self.ulps != ROUNDING_ULPS and not self.tolerance_reason:
            raise ValueError(f"case {self.name!r}: ulps other than the model's {ROUNDING_ULPS:g} needs a "
                             f"tolerance_reason")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"case {self.name!r}: dtype must be 'float32' or 'float64', got {self.dtype!r}")
        P.get(self.problem)  # unknown problems fail at declaration

    @property
    def ours(self) -> Reference:
        if self.backend == "jax":
            return suite(self.entry, self.kwargs, extras=self.extras)
        from jaxopt_suite import registry

        from .references import bridge

        entry = registry.get(self.entry)
        if entry.torch_bridge_class is None:
            raise ValueError(f"registry entry {self.entry!r} has no torch_bridge_class")
        return bridge(entry.torch_bridge_class, flat=self.backend == "bridge_flat",
                      pass_value=entry.requires_value, state_keys=getattr(self.reference, "state_keys", ()),
                      default_dtype=getattr(self.reference, "default_dtype", None), **dict(self.bridge_kwargs or {}))

    def missing(self) -> Optional[str]:
        """Why the case cannot run here (a registry entry is not registered), or ``None``."""
        from jaxopt_suite import registry

        absent = [n for n in (self.entry, *self.requires) if n not in registry.names()]
        if absent:
            return f"registry entry {', '.join(map(repr, absent))} not registered"
        if self.backend != "jax":
            cls = registry.get(self.entry).torch_bridge_class
            if cls is None:
                return f"registry entry {self.entry!r} has no torch_bridge_class"
            try:
                import torch_bridge
            except ModuleNotFoundError:
                return "torch_bridge is not available"
            if not hasattr(torch_bridge, cls):
                return f"torch_bridge has no class {cls!r}"
        return None

    @property
    def modelled(self) -> bool:
        """Whether the error model sets the tolerance (no declared atol/rtol)."""
        return self.atol is None and self.rtol is None

    def tolerance_str(self) -> str:
        if self.modelled:
            return f"{self.measure} {self.ulps:g}δ"
        parts = []
        if self.atol is not None:
            parts.append(f"abs {self.atol:.0e}")
        if self.rtol is not None:
            parts.append(f"rel {self.rtol:.0e}")
        return ", ".join(parts)


@dataclasses.dataclass
class ParityResult:
    """The outcome of :func:`run_case`.

    ``status`` is ``"PASS"``, ``"FAIL"`` (a tolerance or the sensitivity exceeded, or ``check`` failed),
    ``"SKIP"`` (the case cannot run here; ``reason`` says why), ``"ERROR"`` (an exception; ``reason``),
    or for cases with a ``known_issue`` ``"XFAIL"`` (fails as documented) / ``"XPASS"`` (passes: remove the
    marker).
    ``ours``/``ref``/``wrong_traj`` hold the observations after every step (index 0 = initial).
    """

    case: ParityCase
    status: str = "SKIP"
    reason: str = ""
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    wrong_abs: Optional[float] = None
    wrong_rel: Optional[float] = None
    rounding_abs: Optional[float] = None
    rounding_rel: Optional[float] = None
    seconds: float = 0.0
    ours: list = dataclasses.field(default_factory=list)
    ref: list = dataclasses.field(default_factory=list)
    wrong_traj: list = dataclasses.field(default_factory=list)
    ours_side: Any = None
    ref_side: Any = None
    error: Optional[BaseException] = None

    def _bar(self, measure: str, declared: Optional[float], delta: Optional[float]) -> Optional[float]:
        """The tolerance in force on one measure: declared, or K × δ when the model bounds this measure."""
        c = self.case
        if not c.modelled:
            return declared
        return None if c.measure != measure or delta is None else c.ulps * delta

    @property
    def atol(self) -> Optional[float]:
        """The tolerance on ``max_abs`` in force: declared, or K × δ (abs measure), else ``None``."""
        return self._bar("abs", self.case.atol, self.rounding_abs)

    @property
    def rtol(self) -> Optional[float]:
        """The tolerance on ``max_rel`` in force: declared, or K × δ (rel measure), else ``None``."""
        return self._bar("rel", self.case.rtol, self.rounding_rel)

    def tolerance_str(self) -> str:
        """The tolerance in force, e.g. ``"abs 3.1e-13 (8δ)"`` or ``"rel 1e-06"`` (declared)."""
        c = self.case
        if c.modelled and self.atol is None and self.rtol is None:
            return c.tolerance_str()
        parts = []
        if self.atol is not None:
            parts.append(f"abs {self.atol:.1e}" if c.modelled else f"abs {self.atol:.0e}")
        if self.rtol is not None:
            parts.append(f"rel {self.rtol:.1e}" if c.modelled else f"rel {self.rtol:.0e}")
        return ", ".join(parts) + (f" ({c.ulps:g}δ)" if c.modelled else "")

    @property
    def within_tolerance(self) -> bool:
        atol, rtol = self.atol, self.rtol
        if atol is None and rtol is None:
            return False  # the model was not evaluated (an error before it): nothing was shown to agree
        return bool((atol is None or self.max_abs <= atol) and (rtol is None or self.max_rel <= rtol))

    @property
    def sensitivity_ok(self) -> Optional[bool]:
        """Whether the known-wrong variant is far enough away (None without one)."""
        c = self.case
        if c.wrong is None or self.wrong_abs is None:
            return None
        if self.atol is not None:
            return bool(self.wrong_abs > c.wrong_factor * self.atol)
        return bool(self.wrong_rel > c.wrong_factor * self.rtol)

    @property
    def wrong_ratio(self) -> Optional[float]:
        """The known-wrong variant's distance in multiples of the tolerance (None without one)."""
        if self.wrong_abs is None or (self.atol is None and self.rtol is None):
            return None
        return self.wrong_abs / max(self.atol, _TINY) if self.atol is not None else self.wrong_rel / max(self.rtol, _TINY)


def compare(ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """``(max_abs, max_rel)`` between two observations over the keys they share.

    The keys must include every param (a reference that lacks an extra is simply not compared on it).
    """
    keys = [k for k in ref if k in ours]
    if not keys:
        raise ValueError("nothing to compare")
    max_abs = max_rel = 0.0
    for k in keys:
        a = np.asarray(ours[k], np.float64)
        b = np.asarray(ref[k], np.float64)
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch on {k!r}: {a.shape} vs {b.shape}")
        d = float(np.max(np.abs(a - b))) if a.size else 0.0
        if not np.isfinite(d):
            d = float("inf")
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / max(scale, _TINY))
    return max_abs, max_rel


def _x64(dtype: str):
    import jax

    return jax.enable_x64(dtype == "float64")


def drive(reference: Reference, problem: str, dtype: str, steps: int,
          none_grads: Mapping[int, Sequence[str]] = MappingProxyType({}), *, perturb: bool = False):
    """Step ``reference`` on ``problem`` for ``steps`` steps (inside the dtype's x64 context).

    Returns ``(side, observations)``: the live side and its observations (index 0 = initial values, then
    one per step). The gradient at each step comes from the side's own params; params named in
    ``none_grads[step]`` get a ``None`` gradient.

    ``perturb=True`` runs the error model's perturbed trajectory (see :func:`rounding_response`).
    """
    prob = P.get(problem)
    with _x64(dtype):
        init = prob.params("numpy", "float64")
        side = reference.make(init, dtype)
        if perturb:
            eps = float(np.finfo(dtype).eps)
            rng = np.random.default_rng(_PERTURB_SEED)
        traj = [side.observe()]
        for step in range(steps):
            value, grads = prob.value_and_grad(side.framework, side.params(), step, dtype)
            if perturb:
                grads = {k: g * (1 + eps * sign).astype(dtype) for (k, g), sign in zip(grads.items(), _signs(rng, grads))}
                value = value * (1 + eps * rng.choice([-1.0, 1.0]))
            skipped = set(none_grads.get(step, ()))
            if skipped:
                grads = {k: (None if k in skipped else g) for k, g in grads.items()}
            side.step(grads, value=value)
            if perturb:
                side.perturb(eps, dict(zip(init, _signs(rng, init))))
            traj.append(side.observe())
    return side, traj


def _signs(rng, arrays: Mapping[str, Any]) -> list:
    """Independent random signs (±1) shaped like each of ``arrays``' values, in their order."""
    return [rng.choice([-1.0, 1.0], size=np.shape(v)) for v in arrays.values()]


def max_diff(ours: Sequence[Mapping[str, np.ndarray]], ref: Sequence[Mapping[str, np.ndarray]]):
    """``(max_abs, max_rel)`` over two trajectories (see :func:`compare`)."""
    if len(ours) != len(ref):
        raise ValueError(f"trajectories of different lengths: {len(ours)} vs {len(ref)}")
    pairs = [compare(a, b) for a, b in zip(ours, ref)]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


class TrajectoryCache:
    """Our side's trajectory for one configuration (backend, entry, kwargs, problem, dtype, steps,
    none_grads, extras) is computed once and shared by the cases that compare it with several references;
    a reference's (and a known-wrong variant's) trajectory is computed once and shared by the backends of
    ours compared with it (discovery gives the ``@bridge_*`` copies of a case the same reference object)."""

    def __init__(self):
        self._store: dict = {}
        self._refs: dict = {}

    def reference(self, reference: Reference, case: ParityCase):
        """``drive(reference, ...)`` on the case's problem, computed once per reference object."""
        key = (id(reference), case.problem, case.dtype, case.steps,
               tuple(sorted((k, tuple(v)) for k, v in case.none_grads.items())))
        if key not in self._refs:
            # keep the reference alive with its trajectory, so that its id is never reused for another
            self._refs[key] = (reference, drive(reference, case.problem, case.dtype, case.steps, case.none_grads))
        return self._refs[key][1]

    @staticmethod
    def _key(case: ParityCase, backend: str):
        kwargs_key = id(case.kwargs) if callable(case.kwargs) else repr(sorted(dict(case.kwargs).items()))
        bridge_key = None if backend == "jax" else (
            repr(sorted(dict(case.bridge_kwargs or {}).items())), getattr(case.reference, "state_keys", ()),
            getattr(case.reference, "default_dtype", None))
        return (backend, case.entry, kwargs_key, bridge_key, case.problem, case.dtype, case.steps,
                tuple(sorted((k, tuple(v)) for k, v in case.none_grads.items())), id(case.extras))

    def _ours(self, case: ParityCase):
        key = self._key(case, case.backend)
        if key not in self._store:
            ours = case.ours
            self._store[key] = (ours, drive(ours, case.problem, case.dtype, case.steps, case.none_grads))
        return self._store[key]

    def get(self, case: ParityCase):
        """Our side and trajectory for the case's configuration (computed once)."""
        return self._ours(case)[1]

    def rounding(self, case: ParityCase) -> tuple[float, float]:
        """``(δ_abs, δ_rel)`` of :func:`rounding_response` for the case's configuration, computed once and
        shared by its backends (the bridge computes the same update as the JAX registry entry)."""
        key = ("rounding", *self._key(case, "jax")[1:])
        if key not in self._store:
            jax_case = dataclasses.replace(case, backend="jax")
            ours, (_, base) = self._ours(jax_case)
            self._store[key] = rounding_response(ours, case, base=base)
        return self._store[key]


def rounding_response(ours: Reference, case: ParityCase, *, base=None) -> tuple[float, float]:
    """The error model of the parity tolerances: ``(δ_abs, δ_rel)``, how far our trajectory moves when
    every step carries one rounding error per element.

    Two correct implementations of one update rule differ only in how they round: another order of the
    same operations (fused or not, vectorised with other widths, other BLAS kernels in an autograd
    backward pass). Per step and per element that is a few roundings, each at most one unit of roundoff;
    what matters for a trajectory is how such differences grow over the steps, which depends on the
    problem's conditioning and the optimizer's dynamics (contracting near a minimum, amplified by Adam's
    ``1/√v`` where ``v`` is small, chaotic on Rosenbrock, retraced by ELRA). That growth is measured
    rather than assumed: our side is driven again with, at every step, every gradient element, the loss
    and every updated parameter multiplied by ``1 ± ε`` (ε the dtype's machine epsilon, independent
    random signs), and ``δ`` is :func:`max_diff` between that trajectory and the unperturbed one.

    A modelled case passes when ``max |ours − reference| ≤ K δ`` (``K = case.ulps``, by default
    :data:`ROUNDING_ULPS` = 8: up to 8 such roundings of difference per element and step, against the
    ≤ 2 measured for the rows whose references differ from us only in rounding, which leaves room for
    other CPUs). δ scales with the dtype (ε) and the number of steps, so float64 bars stay as tight as
    the problem allows and float32 bars widen where the dynamics amplify rounding.
    """
    if base is None:
        _, base = drive(ours, case.problem, case.dtype, case.steps, case.none_grads)
    _, perturbed = drive(ours, case.problem, case.dtype, case.steps, case.none_grads, perturb=True)
    return max_diff(perturbed, base)


def run_case(case: ParityCase, *, cache: Optional[TrajectoryCache] = None) -> ParityResult:
    """Drive our side, the reference and the known-wrong variant on the case's problem and compare."""
    result = ParityResult(case=case)
    reason = case.missing()
    if reason is not None:
        result.reason = reason
        return result
    t0 = time.perf_counter()
    try:
        cache = cache or TrajectoryCache()
        ours_side, ours = cache.get(case)
        ref_side, ref = cache.reference(case.reference, case)
        result.max_abs, result.max_rel = max_diff(ours, ref)
        if case.modelled:
            result.rounding_abs, result.rounding_rel = cache.rounding(case)
        if case.wrong is not None:
            _, result.wrong_traj = cache.reference(case.wrong, case)
            result.wrong_abs, result.wrong_rel = max_diff(ours, result.wrong_traj)
    except ModuleNotFoundError as exc:  # an optional reference package is not installed
        result.status, result.reason = "SKIP", f"missing module: {exc.name}"
        return result
    except Exception as exc:  # noqa: BLE001 - reported as a row; the tests re-raise it
        result.status, result.reason = "ERROR", f"{type(exc).__name__}: {exc}"
        result.error = exc
        result.seconds = time.perf_counter() - t0
        return result
    result.seconds = time.perf_counter() - t0
    result.ours, result.ref = ours, ref
    result.ours_side, result.ref_side = ours_side, ref_side
    failures = []
    if not result.within_tolerance:
        failures.append(f"exceeds {result.tolerance_str()}")
    if result.sensitivity_ok is False:
        failures.append(f"known-wrong variant only {result.wrong_abs:.2e} away (< {case.wrong_factor:g}x tol)")
    if case.check is not None:
        try:
            case.check(result)
        except AssertionError as exc:
            failures.append(f"check failed: {exc}")
    if case.known_issue:
        result.status = "XFAIL" if failures else "XPASS"
        result.reason = ("; ".join(failures) + f" (known issue: {case.known_issue})") if failures else (
            f"passes although marked as a known issue: {case.known_issue}")
    else:
        result.status = "FAIL" if failures else "PASS"
        result.reason = "; ".join(failures)
    return result


# --------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------


BRIDGE_BACKENDS = ("bridge_flat", "bridge_simple")


def case_modules() -> list[str]:
    """Names of the ``parity.cases_<family>`` modules, sorted."""
    import parity

    return sorted(
        f"parity.{m.name}" for m in pkgutil.iter_modules(parity.__path__) if m.name.startswith("cases_")
    )


def discover(keyword: Optional[str] = None, *, backends: Optional[Sequence[str]] = None) -> list[ParityCase]:
    """Every case of every ``parity/cases_<family>.py`` (optionally only names containing ``keyword``, and
    only the given ``backends`` of ours: ``"jax"``, ``"bridge_flat"``, ``"bridge_simple"``).

    A module exposes ``CASES`` (list) and/or ``cases()`` (returning a list). Names must be unique. Cases
    with ``bridge_kwargs`` are repeated for each bridge backend.
    """
    found: list[ParityCase] = []
    seen: dict[str, str] = {}
    for module_name in case_modules():
        module = importlib.import_module(module_name)
        family = module_name.split(".cases_", 1)[1]
        cases = list(getattr(module, "CASES", []))
        if hasattr(module, "cases"):
            cases += list(module.cases())
        for case in cases:
            if not isinstance(case, ParityCase):
                raise TypeError(f"{module_name}: {case!r} is not a ParityCase")
            if case.name in seen:
                raise ValueError(f"duplicate parity case {case.name!r} in {module_name} and {seen[case.name]}")
            seen[case.name] = module_name
            case = dataclasses.replace(case, family=case.family or family)
            found.append(case)
            if case.bridge_kwargs is not None and case.backend == "jax":
                for backend in BRIDGE_BACKENDS:
                    found.append(dataclasses.replace(case, name=f"{case.name}@{backend}", backend=backend,
                                                     extras=None))
    if keyword:
        found = [c for c in found if keyword in c.name or keyword in c.entry or keyword in c.reference.name]
    if backends is not None:
        found = [c for c in found if c.backend in backends]
    return found


def run_all(cases: Sequence[ParityCase], *, on_result: Optional[Callable[[ParityResult], None]] = None):
    """Run ``cases`` in order, sharing our side's trajectories between cases (trajectories and live sides
    are dropped from the returned results)."""
    results = []
    cache = TrajectoryCache()
    for case in cases:
        res = run_case(case, cache=cache)
        res.ours_side = res.ref_side = None
        res.ours, res.ref, res.wrong_traj = [], [], []
        if on_result is not None:
            on_result(res)
        results.append(res)
    return results
