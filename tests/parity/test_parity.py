"""Every discovered parity case (``parity/cases_<family>.py``) through the same runner as ``python -m parity``.

``test_parity`` asserts the tolerance and the case's own checks; ``test_sensitivity`` asserts that the
case's known-wrong variant is far away (so the comparison can fail). Cases whose registry entry is not
registered are skipped with the reason; cases marked with a known issue are strict xfails.
"""

from __future__ import annotations

import pytest

from parity.runner import ParityResult, TrajectoryCache, discover, run_case

CASES = discover()
_NAMES = {c.name for c in CASES}
_CACHE = TrajectoryCache()
_RESULTS: dict[str, ParityResult] = {}


def _group(case):
    # the backends of one case share the reference's trajectory (and test_sensitivity reuses the result):
    # under ``--dist loadgroup`` they run in one worker, so each reference is driven once
    return pytest.mark.xdist_group(case.name.split("@", 1)[0])


def _slow_in_this_suite(case) -> bool:
    """The case is slow, or it is a row through the bridge's simple (per-tensor) path in float32 or on the
    digits model: the default suite runs that path in float64 on the small problems (quad, mlp, rosenbrock:
    the same bridge code, tighter bars) and the float32 and digits bridge rows on the flat path; the other
    simple-path rows (about 50 s of the default run) run with ``-m slow`` and in ``python -m parity``."""
    simple = case.name.endswith("@bridge_simple")
    if case.slow or (simple and (case.dtype == "float32" or "digits" in case.problem)):
        return True
    # the pure-JAX float32 twin of a float64 row (same entry, kwargs and reference; the float64 row has the
    # tight bar, the bridge's float32 rows keep float32 in the default run), and the bridge-vs-JAX rows on
    # the digits model (the bridge-vs-torch digits rows and the small-problem bridge-vs-JAX rows stay)
    if case.dtype == "float32" and "@" not in case.name and case.name.replace("_f32", "_f64") in _NAMES:
        return True
    return "_vs_jax_" in case.name and "digits" in case.problem


def _marks(case):
    marks = [pytest.mark.slow] if _slow_in_this_suite(case) else []
    marks.append(_group(case))
    if case.known_issue:
        marks.append(pytest.mark.xfail(reason=case.known_issue, strict=True))
    return marks


def _result(case) -> ParityResult:
    reason = case.missing()
    if reason:
        pytest.skip(reason)
    if case.name not in _RESULTS:
        _RESULTS[case.name] = run_case(case, cache=_CACHE)
    res = _RESULTS[case.name]
    if res.status == "SKIP":
        pytest.skip(res.reason)
    if res.error is not None:
        raise res.error
    return res


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=_marks(c)) for c in CASES])
def test_parity(case):
    res = _result(case)
    assert res.within_tolerance, (
        f"{case.name}: max |Δ| {res.max_abs:.3e}, max rel {res.max_rel:.3e} vs {res.tolerance_str()} "
        f"(rounding response δ abs {res.rounding_abs}, rel {res.rounding_rel}) against {case.reference.describe()}"
    )
    if case.check is not None:
        case.check(res)


SENSITIVE = [c for c in CASES if c.wrong is not None]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=([pytest.mark.slow] if _slow_in_this_suite(c) else [])
                                                 + [_group(c)])
                                  for c in SENSITIVE])
def test_sensitivity(case):
    res = _result(case)
    assert res.sensitivity_ok, (
        f"{case.name}: the known-wrong variant {case.wrong.name} is only {res.wrong_ratio:.3g} x the "
        f"tolerance ({res.tolerance_str()}) away (needs > {case.wrong_factor:g} x)"
    )


def test_cases_discovered():
    assert CASES, "no parity case discovered"
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.family for c in CASES} >= {"torch"}
