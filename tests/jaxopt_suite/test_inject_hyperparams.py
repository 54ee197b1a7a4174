"""``jaxopt_suite.inject_hyperparams`` and learning-rate schedules, for every registry entry.

Behaviour is selected by the entries' fields (``static_args``, ``requires_value``, ``supports_schedules``),
never by their names. Problem: a small weighted quadratic on two float32 leaves, three steps.
"""

from __future__ import annotations

import functools
import inspect
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_suite as js
from jaxopt_suite import registry
from jaxopt_suite._common import INIT_ONLY_ATTR, StaticDefault, factory_signature, static_args_of
from tests.registry_params import ENTRIES, by_entry

STEPS = 3
NO_VALUE = types.SimpleNamespace(requires_value=False)  # for transformations outside the registry


def _params():
    return {"w": jnp.linspace(-1.5, 2.0, 6, dtype=jnp.float32).reshape(3, 2),
            "b": jnp.asarray([0.3, -0.7], jnp.float32)}


def _loss(params):
    return sum(0.5 * jnp.sum(jnp.linspace(0.5, 2.0, p.size).reshape(p.shape) * (p - 0.25 * (i + 1)) ** 2)
               for i, (_, p) in enumerate(sorted(params.items())))


def _step_fn(entry, tx):
    def step(params, state):
        value, grads = jax.value_and_grad(_loss)(params)
        extra = {"value": value} if entry.requires_value else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, updates
    return step


def _run(entry, tx, steps=STEPS, state=None, step=None):
    step = jax.jit(_step_fn(entry, tx)) if step is None else step
    params = _params()
    state = tx.init(params) if state is None else state
    out = []
    for _ in range(steps):
        params, state, updates = step(params, state)
        out.append(updates)
    return out, state


@functools.lru_cache(maxsize=None)
def _plain(name):
    """The plain factory's updates with the entry's settings (compiled once, shared by the tests)."""
    entry = registry.get(name)
    return _run(entry, entry.build())[0]


def _close(a, b, rtol, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * 1e-3, err_msg=what)


def _equal(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def _value(entry, name):
    """The argument ``name`` as the entry passes it (its kwargs, else the factory default)."""
    if name in entry.kwargs:
        return entry.kwargs[name]
    return factory_signature(entry.factory).parameters[name].default


def _optax_would_inject(value):
    """optax.inject_hyperparams traces numbers and calls callables as schedules (bools and None stay)."""
    return not isinstance(value, bool) and (isinstance(value, (int, float)) or callable(value))


# --------------------------------------------------------------------------------------------------
# the declaration
# --------------------------------------------------------------------------------------------------


@by_entry
def test_static_args_are_the_factory_declaration_and_cover_its_structure(entry):
    assert entry.static_args == static_args_of(entry.factory)
    params = inspect.signature(entry.factory).parameters
    assert set(entry.static_args) <= set(params)
    # every keyword-only option that optax would inject or call (an int, a callable) is declared
    for name, p in params.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        value = _value(entry, name)
        callable_option = "Callable" in str(p.annotation)
        if callable_option or _optax_would_inject(value):
            assert name in entry.static_args, f"{entry.name}: keyword-only {name}={value!r} is not declared"


# --------------------------------------------------------------------------------------------------
# jaxopt_suite.inject_hyperparams == the plain factory; jit without recompiling; hyperparams act
# --------------------------------------------------------------------------------------------------

# Float32 to rounding, not bitwise: a Python float hyperparameter is combined in double before its one
# rounding (e.g. ``1 - b2`` in C.one_minus), an injected one is a float32 array rounded first, and some
# blocks branch on a concrete zero (AutoSGM's filter zero) where a traced value takes the general form.
RTOL = 2e-5


@by_entry
def test_injected_matches_the_plain_factory_under_jit_without_recompiling(entry):
    plain = _plain(entry.name)
    tx = js.inject_hyperparams(entry.factory)(**dict(entry.kwargs))
    traces = []
    step = _step_fn(entry, tx)

    @jax.jit
    def counted(params, state):
        traces.append(1)
        return step(params, state)

    params, state = _params(), tx.init(_params())
    injected = []
    for _ in range(STEPS):
        params, state, updates = counted(params, state)
        injected.append(updates)
        # a changed value (same dtype) is data, not a new program
        state.hyperparams.update({k: v * 1 for k, v in state.hyperparams.items()})
    assert len(traces) == 1
    _close(plain, injected, RTOL, f"{entry.name}: injected vs plain")
    assert set(state.hyperparams).isdisjoint(entry.static_args)


def _changed(value):
    """A different valid value: 0.9 times a float (0 becomes 0.01), one more for an integer."""
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.integer):
        return value + 1
    return np.where(value == 0, 0.01, 0.9 * value).astype(value.dtype)


@by_entry
def test_hyperparams_changed_in_the_state_take_effect(entry):
    """Every injected value, changed in the state after ``init``, acts from the next update on: the updates are
    the factory's with the changed values, from the state ``init`` made with the original ones (one
    compiled step serves both injected runs: the values are data)."""
    tx = js.inject_hyperparams(entry.factory)(**dict(entry.kwargs))
    state0 = tx.init(_params())
    assert state0.hyperparams, f"{entry.name}: nothing injected"
    step = jax.jit(_step_fn(entry, tx))
    changed = {k: _changed(v) for k, v in state0.hyperparams.items()}
    state = state0._replace(hyperparams={k: jnp.asarray(changed[k], v.dtype) for k, v in state0.hyperparams.items()})
    unchanged, _ = _run(entry, tx, state=state0, step=step)
    injected, _ = _run(entry, tx, state=state, step=step)
    reference, _ = _run(entry, entry.build(**{k: v.item() for k, v in changed.items()}),
                        state=entry.build().init(_params()))
    _close(reference, injected, RTOL, f"{entry.name}: {sorted(changed)} changed in state.hyperparams")
    # not vacuous: an injected learning rate (changed by 10 %) moves every update at once. Where the factory
    # keeps it static (read by init only), the few steps here need not show the other values' effect.
    if "learning_rate" in state0.hyperparams:
        assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(injected[-1]),
                                                             jax.tree.leaves(unchanged[-1])))


@by_entry
def test_structural_defaults_are_shown_to_optax_as_static(entry):
    """The factory's signature wraps each structural default that optax would trace, and only those; the
    wrapper reads as the default, and factory_signature gives the real one."""
    shown = inspect.signature(entry.factory).parameters
    real = factory_signature(entry.factory).parameters
    assert list(shown) == list(real)
    for name, p in real.items():
        wrapped = isinstance(shown[name].default, StaticDefault)
        structural = name in entry.static_args and name not in getattr(entry.factory, INIT_ONLY_ATTR)
        assert wrapped == (structural and _optax_would_inject(p.default)), f"{entry.name}: {name}"
        if wrapped:
            assert shown[name].default.value is p.default and repr(shown[name].default) == repr(p.default)


@by_entry
def test_plain_optax_inject_works_with_structural_defaults(entry):
    """optax.inject_hyperparams(factory)(learning_rate=...) with every structural argument at its default:
    the factory's updates, under jit (the wrapped defaults pass optax untouched)."""
    kwargs = {k: v for k, v in entry.kwargs.items() if k not in entry.static_args}
    tx = optax.inject_hyperparams(entry.factory)(**kwargs, learning_rate=_base_lr(entry))
    injected, state = _run(entry, tx)
    plain, _ = _run(entry, entry.factory(**kwargs, learning_rate=_base_lr(entry)))
    _close(plain, injected, RTOL, f"{entry.name}: optax.inject_hyperparams with defaults vs plain")
    assert "learning_rate" in state.hyperparams


@by_entry
def test_plain_optax_inject_names_the_structural_argument(entry):
    """optax.inject_hyperparams without static_args, with the entry's own settings: a clear error naming the
    first structural argument the user passed that optax would trace (or, where there is none, the same
    updates as the factory)."""
    tx = optax.inject_hyperparams(entry.factory)(**dict(entry.kwargs))
    traced = [n for n in entry.static_args if n in entry.kwargs and _optax_would_inject(entry.kwargs[n])
              and not isinstance(entry.kwargs[n], float)]  # floats read by init only are fine traced
    if not traced:
        injected, _ = _run(entry, tx)
        _close(_plain(entry.name), injected, RTOL, f"{entry.name}: optax.inject_hyperparams vs plain")
        return
    with pytest.raises(ValueError, match=rf"Invalid {traced[0]}:.*jaxopt_suite\.inject_hyperparams.*static_args"):
        tx.init(_params())


def test_inject_hyperparams_over_lookahead_and_user_static_args():
    inner = js.adam(3e-2)
    plain, _ = _run(NO_VALUE, js.lookahead(inner, 2, 0.5))
    tx = js.inject_hyperparams(js.lookahead)(inner, sync_period=2, slow_step_size=0.5)
    injected, state = _run(NO_VALUE, tx)
    _equal(plain, injected, "lookahead injected vs plain")
    assert set(state.hyperparams) == {"sync_period", "slow_step_size"}
    # user static_args add to the declared ones
    tx = js.inject_hyperparams(js.lookahead, static_args="slow_step_size")(inner, sync_period=2, slow_step_size=0.5)
    assert set(tx.init(_params()).hyperparams) == {"sync_period"}


# --------------------------------------------------------------------------------------------------
# learning-rate schedules
# --------------------------------------------------------------------------------------------------


def _base_lr(entry):
    return float(_value(entry, "learning_rate"))


@by_entry
def test_learning_rate_schedule_is_used_with_optax_counts_or_rejected(entry):
    lr = _base_lr(entry)
    decaying = optax.exponential_decay(lr, transition_steps=1, decay_rate=0.5)
    if not entry.supports_schedules:
        # the message names the argument, says why (the factory sets its own step size) and what to pass
        with pytest.raises(ValueError, match="Invalid learning_rate: .*not a schedule.*own step size.*as a number"):
            entry.build(learning_rate=decaying)
        with pytest.raises(ValueError, match="Invalid learning_rate: .*schedule"):
            js.inject_hyperparams(entry.factory)(**dict(entry.kwargs), learning_rate=decaying).init(_params())
        return
    # a constant schedule is the constant, bit for bit
    scheduled, _ = _run(entry, entry.build(learning_rate=optax.constant_schedule(lr)))
    _equal(_plain(entry.name), scheduled, f"{entry.name}: constant schedule vs constant")
    # a decaying one: update k is the factory's update with learning_rate = schedule(k), k = 0, 1, ...
    scheduled, _ = _run(entry, entry.build(learning_rate=decaying))
    by_hand = jax.jit(lambda params, state, lr: _step_fn(entry, entry.build(learning_rate=lr))(params, state))
    params = _params()
    state = entry.build().init(params)
    for k in range(STEPS):
        params, state, updates = by_hand(params, state, jnp.float32(lr * 0.5 ** k))
        _close(updates, scheduled[k], 1e-6, f"{entry.name}: step {k} of the decaying schedule")
