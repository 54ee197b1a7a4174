"""The non-finite policy (``nonfinite="propagate" | "skip" | "raise"``) on both backends, for every registry entry.

"Identical" below means bit for bit: every leaf of the parameters and of the state has the same dtype, shape and
bytes (so ``-0.0`` vs ``+0.0`` and NaN payloads count). The properties tested:

* ``"propagate"`` (the default) is the factory without the option: the same ``init``/``update`` jaxprs, so
  every parity row and checkpoint is unchanged;
* ``"skip"``: a step whose gradient holds a NaN or an inf in one element (or, for entries that take the loss,
  whose loss is NaN) leaves the parameters and the inner state identical to before the step and adds 1 to
  ``skips``; the run then continues identically to a run that never saw the step (the PRNG key of a
  stochastic entry is state, so it does not advance either). In the flat layout a NaN in a segment that
  ``grad_mask`` leaves out does not skip the step;
* ``"raise"``: an eager ``update`` raises ``FloatingPointError`` naming the leaf (or the loss) before the inner
  update; under ``jit`` the check is a checkify check;
* the torch bridge: every class takes the option; "skip" skips the whole ``step()`` (all groups), counts it in
  the group key ``nonfinite_skips`` (round-trips through ``state_dict``); "raise" raises at ``step()`` naming
  the param group and parameter, with nothing modified.
"""

from __future__ import annotations

import copy
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxopt_suite as js
import torch_bridge as tb
from jaxopt_suite import registry
from jaxopt_suite._common import FlatLayout, static_args_of
from jaxopt_suite.nonfinite import NONFINITE_POLICIES, SkipNonFiniteState
from tests.registry_params import ENTRIES, by_entry, by_entry_others_slow

SHAPES = {"w": (3, 2), "b": (2,)}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# helpers: a 2-leaf quadratic, bitwise comparison
# --------------------------------------------------------------------------------------------------


def _params():
    return {k: jnp.asarray(np.linspace(-1.0, 1.5, math.prod(s)).reshape(s) + 0.1 * i, jnp.float32)
            for i, (k, s) in enumerate(SHAPES.items())}


def _loss(params):
    return 1.0 + sum(0.5 * jnp.sum((p - 0.25 * (i + 1)) ** 2) for i, (_, p) in enumerate(sorted(params.items())))


_value_and_grad = jax.jit(jax.value_and_grad(_loss))


def _bits(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    return a.dtype.str, a.shape, a.tobytes()


def assert_identical(a, b, what):
    la, ta = jax.tree.flatten(a)
    lb, tb_ = jax.tree.flatten(b)
    assert ta == tb_, f"{what}: tree structures differ"
    for i, (x, y) in enumerate(zip(la, lb)):
        assert _bits(x) == _bits(y), f"{what}: leaf {i} differs ({np.asarray(x)!r} vs {np.asarray(y)!r})"


def _poison(tree, key, bad):
    """``tree`` with element 0 of leaf ``key`` replaced by ``bad`` (NaN or inf)."""
    return {**tree, key: tree[key].reshape(-1).at[0].set(bad).reshape(tree[key].shape)}


@functools.lru_cache(maxsize=None)
def _jax_step(name: str, policy: str, flat: bool = False):
    """``(tx, jitted step(params, state, grads, value, mask))`` for an entry and a policy (shared)."""
    entry = registry.get(name)
    kwargs = {"nonfinite": policy}
    if flat:
        kwargs["segments"] = FlatLayout.from_shapes(list(SHAPES.values()))
    tx = entry.build(**kwargs)

    def step(params, state, grads, value, mask):
        extra = {"value": value} if entry.requires_value else {}
        if mask is not None:
            extra["grad_mask"] = mask
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return tx, jax.jit(step)


# --------------------------------------------------------------------------------------------------
# JAX: the option, "propagate", "skip", "raise"
# --------------------------------------------------------------------------------------------------


@by_entry
def test_every_factory_declares_the_option(entry):
    assert entry.nonfinite_policies == NONFINITE_POLICIES
    assert "nonfinite" in static_args_of(entry.factory)
    with pytest.raises(ValueError, match=r"Invalid nonfinite: 'ignore'; expected one of \['propagate', 'skip', "
                                         r"'raise'\]"):
        entry.build(nonfinite="ignore")


@by_entry
def test_propagate_is_the_factory_without_the_option(entry):
    """Same init and update jaxprs (so the same numbers, state structure and checkpoints as before)."""
    params = _params()
    value, grads = _value_and_grad(params)
    extra = {"value": value} if entry.requires_value else {}
    plain, explicit = entry.build(), entry.build(nonfinite="propagate")
    assert str(jax.make_jaxpr(plain.init)(params)) == str(jax.make_jaxpr(explicit.init)(params))
    state = plain.init(params)
    up = lambda tx: jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state, params)  # noqa: E731
    assert str(up(plain)) == str(up(explicit))
    # "raise" keeps the structure of the state too
    assert jax.tree.structure(entry.build(nonfinite="raise").init(params)) == jax.tree.structure(state)


@by_entry
def test_skip_leaves_params_and_state_identical_and_continues_as_if_never_seen(entry):
    tx, step = _jax_step(entry.name, "skip")
    p0 = _params()
    s0 = tx.init(p0)
    assert isinstance(s0, SkipNonFiniteState) and int(s0.skips) == 0

    def good(p, s):
        v, g = _value_and_grad(p)
        return step(p, s, g, v, None)

    p1, s1 = good(p0, s0)
    bad_steps = [("w", jnp.nan, False), ("b", jnp.inf, False), ("w", -jnp.inf, False)]
    if entry.requires_value:
        bad_steps.append((None, jnp.nan, True))
    p, s = p1, s1
    for n, (key, bad, in_value) in enumerate(bad_steps, start=1):
        v, g = _value_and_grad(p)
        if in_value:
            v = jnp.asarray(bad, v.dtype)
        else:
            g = _poison(g, key, bad)
        p, s = step(p, s, g, v, None)
        assert_identical(p, p1, f"params after bad step {n}")
        assert_identical(s.inner_state, s1.inner_state, f"state after bad step {n}")
        assert int(s.skips) == n
    pa, sa = good(p, s)
    pb, sb = good(p1, s1)  # the run that never saw the bad steps
    assert_identical(pa, pb, "params after the next good step")
    assert_identical(sa.inner_state, sb.inner_state, "state after the next good step")
    assert int(sa.skips) == len(bad_steps) and int(sb.skips) == 0
    assert not all(_bits(x) == _bits(y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(p1))), \
        "the good step did not move the parameters (the test would prove nothing)"


def test_skip_keeps_negative_zero_parameters():
    """The skipped update is -0.0: ``p + (-0.0)`` is ``p`` for ``p = -0.0`` too (``+0.0`` would flip its sign)."""
    tx, step = _jax_step("sgd", "skip")
    p = {"w": jnp.full(SHAPES["w"], -0.0, jnp.float32), "b": jnp.zeros(SHAPES["b"], jnp.float32)}
    s = tx.init(p)
    g = _poison(jax.tree.map(jnp.ones_like, p), "b", jnp.nan)
    new, _ = step(p, s, g, jnp.float32(1.0), None)
    assert_identical(new, p, "params")
    assert np.all(np.signbit(np.asarray(new["w"])))


def _pack(tree, layout):
    flat = np.zeros(layout.total, np.float32)
    for (off, n), k in zip(zip(layout.offsets, layout.numels), SHAPES):
        flat[off:off + n] = np.asarray(tree[k]).reshape(-1)
    return [jnp.asarray(flat)]


@by_entry_others_slow
def test_skip_in_the_flat_layout_honours_grad_mask(entry):
    if not entry.supports_segments:
        pytest.skip("the entry has no flat layout")
    layout = FlatLayout.from_shapes(list(SHAPES.values()))
    tx, step = _jax_step(entry.name, "skip", flat=True)
    params = _pack(_params(), layout)
    state = tx.init(params)
    v, g = _value_and_grad(_params())
    grads = _pack(g, layout)
    seg_b = layout.offsets[1]
    poisoned_b = [grads[0].at[seg_b].set(jnp.nan)]
    poisoned_w = [grads[0].at[0].set(jnp.nan)]
    p_skip, s_skip = step(params, state, poisoned_w, v, None)
    assert_identical(p_skip, params, "params after a NaN in segment 0")
    assert_identical(s_skip.inner_state, state.inner_state, "state after a NaN in segment 0")
    assert int(s_skip.skips) == 1
    if entry.supports_grad_mask:
        mask = [np.array([True, False, True])]  # segment 1 (b) has no gradient; the last entry is the padding's
        p_m, s_m = step(params, state, poisoned_b, v, mask)
        clean = [grads[0].at[seg_b].set(0.0)]
        p_c, s_c = step(params, state, clean, v, mask)
        assert int(s_m.skips) == 0, "a NaN in a masked-out segment skipped the step"
        assert_identical(p_m, p_c, "params (masked-out NaN vs zero)")
        assert_identical(s_m, s_c, "state (masked-out NaN vs zero)")


@by_entry
def test_raise_names_the_leaf_before_updating(entry):
    tx = entry.build(nonfinite="raise")
    params = _params()
    state = tx.init(params)
    v, g = _value_and_grad(params)
    extra = {"value": v} if entry.requires_value else {}
    with pytest.raises(FloatingPointError, match=r"gradient leaf \['b'\] is not finite"):
        tx.update(_poison(g, "b", jnp.inf), state, params, **extra)
    if entry.requires_value:
        with pytest.raises(FloatingPointError, match="loss value is not finite"):
            tx.update(g, state, params, value=jnp.float32(jnp.nan))


def test_raise_under_jit_is_a_checkify_check():
    from jax.experimental import checkify

    tx = js.sgd(0.1, nonfinite="raise")
    params = _params()
    state = tx.init(params)
    g = _poison(jax.tree.map(jnp.ones_like, params), "w", jnp.nan)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    err, _ = checkify.checkify(step, errors=checkify.user_checks)(g, state, params)
    with pytest.raises(Exception, match=r"gradient leaf \['w'\] is not finite"):
        err.throw()
    err, _ = checkify.checkify(step, errors=checkify.user_checks)(jax.tree.map(jnp.ones_like, params), state, params)
    err.throw()  # finite: no error
    with pytest.raises(Exception, match="checkify"):  # never silent: jit without checkify refuses the check
        step(g, state, params)


@pytest.mark.parametrize("inject", ["jaxopt_suite", "optax"])
def test_skip_under_inject_hyperparams(inject):
    wrap = js.inject_hyperparams if inject == "jaxopt_suite" else optax.inject_hyperparams
    tx = wrap(js.adam)(learning_rate=1e-2, nonfinite="skip")
    params = _params()
    state = tx.init(params)
    assert isinstance(state.inner_state, SkipNonFiniteState)
    v, g = _value_and_grad(params)
    updates, new = tx.update(_poison(g, "w", jnp.nan), state, params)
    assert_identical(optax.apply_updates(params, updates), params, "params")
    assert_identical(new.inner_state.inner_state, state.inner_state.inner_state, "adam state")
    assert int(new.inner_state.skips) == 1
    updates, new = tx.update(g, new, params)
    assert int(new.inner_state.skips) == 1 and bool(jnp.all(jnp.isfinite(updates["w"])))


# --------------------------------------------------------------------------------------------------
# the torch bridge
# --------------------------------------------------------------------------------------------------

BUILDERS = {
    "SGD": lambda p, **k: tb.SGD(p, lr=0.1, momentum=0.9, **k),
    "Adam": lambda p, **k: tb.Adam(p, lr=1e-2, **k),
    "AdamW": lambda p, **k: tb.AdamW(p, lr=1e-2, **k),
    "ADOPT": lambda p, **k: tb.ADOPT(p, lr=1e-2, **k),
    "ASGD": lambda p, **k: tb.ASGD(p, lr=1e-2, momentum=0.9, **k),
    "Lookahead": lambda p, **k: tb.Lookahead(tb.SGD(p, lr=0.1, momentum=0.9), k=2, **k),
    "AutoSGM": lambda p, **k: tb.AutoSGM(p, **k),
    "ELRA": lambda p, **k: tb.ELRA(p, lr=1e-3, **k),
    "EnhancedSGD": lambda p, **k: tb.EnhancedSGD(p, seed=0, **k),
    "JaxOptimizer": lambda p, **k: tb.JaxOptimizer(p, "adam", **k),
}
NEEDS_VALUE = ("ELRA", "EnhancedSGD")
NAMES = list(BUILDERS)
X = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)


def test_every_bridge_class_is_covered():
    wanted = {e.torch_bridge_class for e in registry.entries() if e.torch_bridge_class}
    assert wanted <= set(NAMES)


def _build(name, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, BUILDERS[name](model.parameters(), **kwargs)


def _step(name, model, opt, bad=None, bad_loss=False, param=0):
    """One step; ``bad`` (NaN/inf) goes into element 0 of parameter ``param``'s gradient, or into the loss."""
    opt.zero_grad()
    loss = model(X).pow(2).sum() + 1.0
    loss.backward()
    with torch.no_grad():
        if bad is not None and not bad_loss:
            list(model.parameters())[param].grad.view(-1)[0] = bad
        if bad_loss:
            loss = torch.full((), bad)
    if name in NEEDS_VALUE:
        opt.step(value=loss.detach())
    else:
        opt.step()


def _snapshot(model, opt):
    sd = opt.state_dict()
    groups = [{k: v for k, v in g.items() if k != "nonfinite_skips"} for g in sd["param_groups"]]
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(sd["state"]), copy.deepcopy(groups))


def _torch_bits(x):
    if torch.is_tensor(x):
        return str(x.dtype), tuple(x.shape), x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() \
            if x.dim() else x.detach().cpu().reshape(1).view(torch.uint8).numpy().tobytes()
    if isinstance(x, dict):
        return {k: _torch_bits(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_torch_bits(v) for v in x]
    return x


def assert_same_snapshot(a, b, what):
    assert _torch_bits(a[0]) == _torch_bits(b[0]), f"{what}: parameters differ"
    assert _torch_bits(a[1]) == _torch_bits(b[1]), f"{what}: state differs"
    assert _torch_bits(a[2]) == _torch_bits(b[2]), f"{what}: param groups differ"


def _skips(opt):
    return [g.get("nonfinite_skips", 0) for g in opt.state_dict()["param_groups"]]


@pytest.mark.parametrize("name", NAMES)
def test_bridge_default_is_propagate_and_invalid_values_raise(name):
    model, opt = _build(name)
    assert all(g["nonfinite"] == "propagate" for g in opt.param_groups)
    with pytest.raises(ValueError, match=r"Invalid nonfinite: 'nan'; expected one of \['propagate', 'skip', "
                                         r"'raise'\]"):
        _build(name, nonfinite="nan")
    _step(name, model, opt, bad=float("nan"))  # propagate: the NaN is used (for torch's rules, it spreads)
    assert "nonfinite_skips" not in opt.state_dict()["param_groups"][0]


@pytest.mark.parametrize("name", NAMES)
def test_bridge_skip_is_bit_identical_counted_and_round_trips(name):
    model, opt = _build(name, nonfinite="skip")
    ref_model, ref = _build(name, nonfinite="skip")
    _step(name, model, opt)
    _step(name, ref_model, ref)
    before = _snapshot(model, opt)
    bad = [(float("nan"), False, 0), (float("inf"), False, 1)] + ([(float("nan"), True, 0)] if name in NEEDS_VALUE else [])
    for n, (value, in_loss, param) in enumerate(bad, start=1):
        _step(name, model, opt, bad=value, bad_loss=in_loss, param=param)
        assert_same_snapshot(_snapshot(model, opt), before, f"after bad step {n}")
        assert set(_skips(opt)) == {n}
    # resume from the state dict in a fresh optimizer
    sd = copy.deepcopy(opt.state_dict())
    again_model, again = _build(name, nonfinite="skip")
    with torch.no_grad():
        for p, q in zip(again_model.parameters(), model.parameters()):
            p.copy_(q)
    again.load_state_dict(sd)
    assert set(_skips(again)) == {len(bad)}
    for m, o in ((model, opt), (ref_model, ref), (again_model, again)):
        _step(name, m, o)
    after = _snapshot(model, opt)
    assert_same_snapshot(after, _snapshot(ref_model, ref), "continued vs never saw the bad steps")
    assert_same_snapshot(after, _snapshot(again_model, again), "continued vs resumed from the state dict")
    assert set(_skips(opt)) == {len(bad)} and set(_skips(again)) == {len(bad)} and set(_skips(ref)) == {0}
    assert not torch.equal(after[0][0], before[0][0]), "the good step did not move the parameters"


@pytest.mark.parametrize("name", NAMES)
def test_bridge_raise_names_the_parameter_and_modifies_nothing(name):
    model, opt = _build(name, nonfinite="raise")
    _step(name, model, opt)
    before = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"parameter 1 of param group 0 \(shape \(2,\)\) is not finite "
                                                 r"\(1 NaN, 0 inf of 2 elements\); nothing was modified"):
        _step(name, model, opt, bad=float("nan"), param=1)
    assert_same_snapshot(_snapshot(model, opt), before, "after the refused step")
    with pytest.raises(FloatingPointError, match=r"parameter 0 of param group 0 \(shape \(2, 3\)\).*0 NaN, 1 inf"):
        _step(name, model, opt, bad=float("-inf"), param=0)
    if name in NEEDS_VALUE:
        with pytest.raises(FloatingPointError, match="the loss nan is not finite"):
            _step(name, model, opt, bad=float("nan"), bad_loss=True)
    assert_same_snapshot(_snapshot(model, opt), before, "after the refused steps")
    _step(name, model, opt)  # finite again: steps
    assert not torch.equal(model.weight.detach(), before[0][0])


def test_bridge_skip_covers_every_group_of_the_step():
    """A NaN in group 1 skips group 0 too (one decision over all compiled steps, on the device)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = tb.Adam([{"params": [model.weight]}, {"params": [model.bias], "lr": 1e-3}], lr=1e-2, nonfinite="skip")
    _step("Adam", model, opt)
    before = _snapshot(model, opt)
    _step("Adam", model, opt, bad=float("nan"), param=1)
    assert_same_snapshot(_snapshot(model, opt), before, "after the NaN in group 1")
    assert _skips(opt) == [1, 1]
    _step("Adam", model, opt)
    assert not torch.equal(model.weight.detach(), before[0][0])
    assert _skips(opt) == [1, 1]
