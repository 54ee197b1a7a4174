"""ELRA vs the PyPI package ``elra`` 0.0.5, teacher-forced call by call (see ``parity/cases_elra.py``).

Every call of the package is replayed through ``elra_step`` with our own evolving state: branch decisions
(collect-only / moved / retrace) and all counters must agree exactly, the new parameters within 1e-4
relative, continuous scalars within 1e-3 (DNN) or 1e-2 (MATH alpha). Longer scenarios are ``slow``;
``python -m parity.cases_elra`` prints all of them.
"""

from __future__ import annotations

import pytest

pytest.importorskip("elra")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

from parity.cases_elra import SCENARIOS, run_example1  # noqa: E402

FAST = ["digits_dnn", "rosenbrock_math", "digits_step_retrace"]
SLOW = ["digits_wd_losses", "digits_nan", "digits_math", "linear_collect", "example1_math", "digits_momentum",
        "rosenbrock_inject"]


def _check(rep, xtol, stol):
    assert rep.calls > 0
    assert rep.branch_mismatches == 0, rep.first_mismatch
    assert rep.counter_mismatches == 0, rep.first_mismatch
    assert rep.x_max_rel <= xtol
    worst = max(rep.scalar_max_rel.items(), key=lambda kv: kv[1], default=("-", 0.0))
    assert worst[1] <= stol, worst
    assert not rep.floor_deadlock  # the reference run must not sit in the lr-floor deadlock


@pytest.mark.parametrize("name", FAST)
def test_teacher_forced_parity(name):
    run, xtol, stol = SCENARIOS[name]
    rep = run()
    _check(rep, xtol, stol)
    if name == "digits_step_retrace":
        assert rep.retraces >= 3  # the forced retraces are replayed


def test_readme_example1_math_mode_short():
    rep = run_example1(steps=300)
    _check(rep, 1e-4, 1e-2)
    assert rep.retraces >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_teacher_forced_parity_long(name):
    run, xtol, stol = SCENARIOS[name]
    rep = run()
    _check(rep, xtol, stol)
    if name == "linear_collect":
        assert rep.final_collects >= 4 and rep.collect_only > 0
    if name == "digits_nan":
        assert rep.retraces >= 15
