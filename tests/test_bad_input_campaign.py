"""The bad-input campaign (issue 15.6): every registry entry, both backends, never a silent poison.

The cases are built and classified by :mod:`tests.campaign` (read its docstring for the categories):
bad hyperparameters for every argument of every registry factory, every ``torch_bridge`` class in
``torch_bridge.__all__`` and the generic ``torch_bridge.JaxOptimizer(params, name, ...)`` (nan, ±inf, out
of range, None, strings, bools for numbers, non-bools for flags, unknown choices); NaN/inf in one gradient
element or in the loss (``value=``), at step 1 and at step 3, under ``nonfinite="propagate"`` (the default),
``"skip"`` and ``"raise"``; malformed state dicts (missing/extra key, wrong shape, wrong dtype, another
class's state dict, wrong group count or size). Each test asserts that no case of its group is SILENT
(accepted nonsense, a result off its reference) or LATE (an unrelated error, or an error only at ``step``
for a construction-time problem). ``python -m tests.campaign`` prints the count table; pytest prints it at
the end of the session (``tests/conftest.py``).

POLICY decisions (accepted behaviour that is documented, each checked rather than assumed):

* ``nonfinite="propagate"`` on SGD / Adam / AdamW / ASGD / ADOPT (JAX factories and bridge classes): must
  reproduce ``torch.optim`` (torch-adopt for ADOPT) on the same gradients, NaN/inf pattern equal and finite
  values close; that is the documented default (torch_semantics.md: these are torch's rules) and
  docs/optimizers.md "Non-finite gradients". For the other optimizers (AutoSGM, Lookahead, ELRA,
  EnhancedSGD) there is no torch reference, so propagate is POLICY only where the ``nonfinite`` option
  exists (its documentation, docs/optimizers.md and docs/bridge.md, says what each one does) and the run
  does not raise; before that it is counted UNCOVERED.
* ``nonfinite="skip"``: POLICY only when the step leaves parameters and state bit-identical (the JAX state
  except its ``skips`` counter; the bridge's ``state_dict()['state']`` and param groups except
  ``nonfinite_skips``) and the run then continues bit for bit as a run that never saw that step.
* ``nonfinite="raise"``: CLEAR when the update (JAX, eager) or ``step()`` (bridge) raises
  ``FloatingPointError``/``ValueError`` naming the leaf / parameter (or the loss) and the bridge left the
  parameters unchanged.
* ``load_state_dict``: a ``UserWarning`` where torch.optim accepts silently (SGD's missing
  ``momentum_buffer``: "not started"), documented in torch_bridge/optimizer.py; float64 state for float32
  parameters is cast as torch casts it (not drawn here: it is valid, see test_load_state_dict_validation);
  integer (int32) state for a float parameter is cast the same way by torch.optim, so it is POLICY when the
  run equals the one from the state cast by hand. A complex tensor for a real parameter, a list instead of a
  tensor, and every other corruption must raise (or, where torch accepts, warn).
* torch.optim's implementation flags (``foreach``, ``fused``, ``differentiable``, ``capturable``): torch's
  own error type for them is ``RuntimeError`` (e.g. "`fused` is not currently supported"), so a
  ``RuntimeError`` naming the flag counts as CLEAR there, and only there.
* Compatibility arguments documented as accepted and ignored (``ELRA``'s ``mode``/``dummy``,
  ``EnhancedSGD``'s ``decay``/``usage_case``/``max_steps``; their class docstrings): POLICY when the run
  with a bad value is bit-identical to the default run.
* Not drawn as bad: ``None`` where ``None`` is the documented default (SGD/ASGD/ELRA ``momentum``: no
  buffer; torch's ``foreach``/``fused``: torch decides; ``seed=None``); ``+inf`` for ASGD's ``t0`` (never
  start averaging) and the GradScaler's ``loss_limit``; negative values for arguments without a documented
  lower bound (ASGD's ``alpha``, AutoSGM's ``gamma_i``/``eta_i``, EnhancedSGD's
  ``loss_correction_factor``, ``centering_axis``); a non-integral ELRA ``warmup`` (a traced hyperparameter
  compared with the step count, so 2.5 has a meaning).

The non-finite cases of the generic ``JaxOptimizer`` for every entry (one compiled step each) are
``@pytest.mark.slow``; its hyperparameter and state-dict cases run by default.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_bridge as tb
from jaxopt_suite import registry
from jaxopt_suite._common import factory_signature, static_args_of
from tests import campaign as C

GROUPS = {
    "hyper/jax": C.campaign_hyper_jax,
    "hyper/torch": C.campaign_hyper_torch,
    "nonfinite/jax": C.campaign_nonfinite_jax,
    "nonfinite/torch": lambda: C.campaign_nonfinite_torch(generic=False),
    "state/torch": C.campaign_state,
}
_RESULTS: dict = {}


def results(group):
    if group not in _RESULTS:
        import warnings

        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # torch's intra-op threads spin against each other on a loaded machine
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _RESULTS[group] = GROUPS[group]() if group in GROUPS else None
        finally:
            torch.set_num_threads(threads)
        C.RECORDED.extend(_RESULTS[group])
    return _RESULTS[group]


def assert_clean(outcomes):
    assert outcomes, "no cases were tried"
    bad = [o for o in outcomes if o.category in (C.SILENT, C.LATE)]
    listing = "\n".join(str(o) for o in bad[:60])
    assert not bad, f"{len(bad)} of {len(outcomes)} cases SILENT or LATE:\n{listing}\n\n{C.table(outcomes)}"


@pytest.mark.parametrize("group", list(GROUPS))
def test_campaign_group(group):
    assert_clean(results(group))


@pytest.mark.slow
def test_campaign_generic_jaxoptimizer_nonfinite():
    """The non-finite cases for ``JaxOptimizer(params, name)`` of every registry entry."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [o for o in C.campaign_nonfinite_torch(generic=True) if o.target.startswith("JaxOptimizer[")]
    C.RECORDED.extend(got)
    assert_clean(got)


def test_campaign_covers_every_entry_and_class():
    """Every registry entry and every class of ``torch_bridge.__all__`` is a campaign target (no gaps)."""
    jax_targets = {c[0] for c in [(e.name,) for e in registry.entries() if list(C.jax_hyper_cases(e))]}
    assert jax_targets == set(registry.names())
    for e in registry.entries():  # every traced hyperparameter and every static number/flag/choice is drawn
        drawn = {arg for arg, _, _ in C.jax_hyper_cases(e)}
        static = set(static_args_of(e.factory)) - C.SKIP_JAX_ARGS - {"clip_value_fn"}
        assert set(e.hyperparams) | static <= drawn, (e.name, (set(e.hyperparams) | static) - drawn)
    torch_targets = {case[0] for case in C.torch_hyper_cases()}
    classes = {n for n in tb.__all__ if inspect.isclass(getattr(tb, n))}
    assert classes - {"JaxOptimizer"} <= torch_targets, classes - torch_targets
    assert {f"JaxOptimizer[{n}]" for n in registry.names()} <= torch_targets
    nonfinite_targets = set(C.torch_nonfinite_targets(generic=False))
    assert {e.torch_bridge_class for e in registry.entries()} <= {t.split("-")[0] for t in nonfinite_targets}
    state_targets = {t.split("[")[0] for t in C.STATE_TARGETS}
    assert classes - {"ElraGradScaler"} <= state_targets, classes - state_targets


def test_classifier_tells_the_categories_apart():
    """The classifier itself: a named ValueError is CLEAR, an unnamed or foreign error LATE, acceptance SILENT."""
    entry = registry.get("adam")
    assert C.classify_error(ValueError("Invalid learning_rate: nan"), C.arg_names("learning_rate"), "x")[0] == C.CLEAR
    assert C.classify_error(ValueError("Invalid learning rate: nan"), C.arg_names("lr"), "x")[0] == C.CLEAR
    assert C.classify_error(TypeError("bad operand"), C.arg_names("eps"), "x")[0] == C.LATE
    assert C.classify_error(ZeroDivisionError("eps"), C.arg_names("eps"), "x")[0] == C.LATE
    assert not C.names_any("Invalid beta_i: nan", ["b"])  # words, not substrings
    # a factory that accepts everything would be counted SILENT, one that fails in update LATE
    fake = type("E", (), {"name": "fake", "requires_value": False})()
    fake.build = lambda **kw: entry.build()
    assert C.run_jax_hyper(fake, "eps", "nan", math.nan).category == C.SILENT
    fake.build = lambda **kw: entry.build(eps=None)
    assert C.run_jax_hyper(fake, "eps", "None", None).category in (C.LATE, C.CLEAR)
    assert C.same_pattern([1.0, math.nan], [1.0 + 1e-9, math.nan]) and not C.same_pattern([1.0, 2.0], [1.0, math.nan])


# ---- hypothesis: extra random draws of bad numbers, construction only -----------------------------------------

def _numeric_args(entry):
    sig = factory_signature(entry.factory)
    return [n for n, p in sig.parameters.items() if n not in C.SKIP_JAX_ARGS and n in entry.hyperparams]


ARGS = [(e.name, a) for e in registry.entries() for a in _numeric_args(e)]


def _bad_numbers(arg):
    low, low_inc, high, high_inc = C.DOMAINS.get(arg, (None, None, None, None))
    options = [st.just(math.nan), st.just(-math.inf), st.text(max_size=4), st.booleans()]
    if arg not in C.INF_OK:
        options.append(st.just(math.inf))
    if low is not None:
        options.append(st.floats(max_value=low, exclude_max=low_inc, allow_nan=False, allow_infinity=False))
    if high is not None:
        options.append(st.floats(min_value=high, exclude_min=high_inc, allow_nan=False, allow_infinity=False))
    return st.one_of(options)


@st.composite
def bad_draw(draw):
    name, arg = draw(st.sampled_from(ARGS))
    return name, arg, draw(_bad_numbers(arg))


def _hypothesis_case(backend, draw):
    name, arg, value = draw
    if backend == "jax":
        return C.run_jax_hyper(registry.get(name), arg, f"drawn {value!r}", value)
    key = "lr" if arg == "learning_rate" else arg
    return C.run_torch_hyper(f"JaxOptimizer[{name}]", key, f"drawn {value!r}", value,
                             lambda p, **kw: tb.JaxOptimizer(p, name, **kw), C.arg_names(key))


@pytest.mark.parametrize("backend", ["jax", "torch"])
@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(draw=bad_draw())
def test_random_bad_hyperparameters_raise_clearly(backend, draw):
    outcome = dataclasses.replace(_hypothesis_case(backend, draw), group="hyper-draw")
    C.RECORDED.append(outcome)
    assert outcome.category == C.CLEAR, str(outcome)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(draw=bad_draw())
def test_random_bad_hyperparameters_raise_clearly_long(backend, draw):
    outcome = _hypothesis_case(backend, draw)
    assert outcome.category == C.CLEAR, str(outcome)
