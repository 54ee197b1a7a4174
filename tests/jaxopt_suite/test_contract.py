"""The contract every registry entry meets (integration spec §1, §4–§6), parametrised from the registry.

No test looks at an entry's name: behaviour is selected by the entry's fields (``requires_value``,
``static_args``, ``converge``, ``supports_complex``, ``supports_segments``, ``supports_grad_mask``).
Compiled functions are shared between tests through small caches keyed by entry and dtype.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import registry
from jaxopt_suite._common import FlatLayout
from tests.registry_params import ENTRIES, ONE_PER_FAMILY, by_entry, by_entry_others_slow

SHAPES = {"w": (4, 3), "b": (3,)}
EXTRA_NAME = "unexpected_extra_args_your_optimizer_doesnt_expect"


# --------------------------------------------------------------------------------------------------
# a small problem: a weighted quadratic on two leaves (value and gradient from jax, conj for complex)
# --------------------------------------------------------------------------------------------------


def _init_params(dtype=jnp.float32, shapes=SHAPES):
    out = {}
    for i, (k, shape) in enumerate(shapes.items()):
        n = int(np.prod(shape))
        x = np.linspace(-1.5, 2.0, n).reshape(shape) + 0.1 * i
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x = x + 1j * np.linspace(0.5, -0.5, n).reshape(shape)
        out[k] = jnp.asarray(x, dtype)
    return out


def _loss(params):
    total = 0.0
    for i, (k, p) in enumerate(sorted(params.items())):
        target = 0.25 * (i + 1)
        weight = jnp.linspace(0.5, 2.0, p.size).reshape(p.shape)
        err = jnp.abs(p - target)
        total = total + 0.5 * jnp.sum(weight * err.astype(jnp.promote_types(err.dtype, jnp.float32)) ** 2)
    return total


def _value_and_grad(params):
    value, grads = jax.value_and_grad(_loss)(params)
    # jax.grad of a real loss gives the conjugate of the steepest-ascent direction for complex leaves
    return value, jax.tree.map(jnp.conj, grads)


def _extra(entry, value):
    return {"value": value} if entry.requires_value else {}


def _update(entry, tx, params, state, **more):
    value, grads = _value_and_grad(params)
    return tx.update(grads, state, params, **_extra(entry, value), **more)


def _step_fn(entry, tx):
    def step(params, state):
        updates, state = _update(entry, tx, params, state)
        return optax.apply_updates(params, updates), state, updates

    return step


@functools.lru_cache(maxsize=None)
def _compiled_step(name: str):
    """The entry's transformation and its jitted f32 step (shared by several tests)."""
    entry = registry.get(name)
    tx = entry.build()
    return tx, jax.jit(_step_fn(entry, tx))


def _run(step, params, state, n):
    for _ in range(n):
        params, state, _ = step(params, state)
    return params, state


def _assert_trees_equal(a, b, what=""):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"{what}: tree structures differ"
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        assert np.array_equal(x, y, equal_nan=True), f"{what}: values differ (max {np.max(np.abs(x - y))})"


def _avals(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype), bool(getattr(jax.typeof(x), "weak_type", False))),
                        tree)


# --------------------------------------------------------------------------------------------------
# jit, recompilation, extra args
# --------------------------------------------------------------------------------------------------


@by_entry
def test_jit_without_recompiling(entry):
    tx = entry.build()
    traces = []

    def step(params, state):
        traces.append(1)  # runs once per trace: a second trace means a recompile
        return _step_fn(entry, tx)(params, state)

    jstep = jax.jit(step)
    params = _init_params()
    state = tx.init(params)
    for _ in range(3):
        params, state, updates = jstep(params, state)
    assert len(traces) == 1, f"traced {len(traces)} times: state structure or weak types change between steps"
    for leaf in jax.tree.leaves((params, updates)):
        assert np.all(np.isfinite(np.asarray(leaf)))


@by_entry_others_slow
def test_unexpected_extra_args_are_accepted_and_ignored(entry):
    tx, step = _compiled_step(entry.name)
    params, state = _run(step, _init_params(), tx.init(_init_params()), 2)

    @jax.jit
    def both(params, state):
        plain = _update(entry, tx, params, state)
        extra = _update(entry, tx, params, state, **{EXTRA_NAME: jnp.ones(3)})
        return plain, extra

    plain, extra = both(params, state)
    _assert_trees_equal(plain, extra, "with an unexpected extra arg")


# --------------------------------------------------------------------------------------------------
# inject_hyperparams
# --------------------------------------------------------------------------------------------------


@by_entry
def test_inject_hyperparams_gives_identical_results(entry):
    """float64 with float64 hyperparameters, so that injected (traced) and Python values round alike."""
    with jax.enable_x64(True):
        plain = entry.build()
        injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args,
                                            hyperparam_dtype=jnp.float64)(**dict(entry.kwargs))
        params0 = _init_params(jnp.float64)
        results = []
        for tx in (plain, injected):
            step = jax.jit(_step_fn(entry, tx))
            params, state = params0, tx.init(params0)
            traj = []
            for _ in range(4):
                params, state, updates = step(params, state)
                traj.append(updates)
            results.append(traj)
        for a, b in zip(*results):
            jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-13,
                                                                 atol=1e-15), a, b)
        assert isinstance(state, optax.InjectStatefulHyperparamsState) or hasattr(state, "hyperparams")


# --------------------------------------------------------------------------------------------------
# dtype stability
# --------------------------------------------------------------------------------------------------

DTYPES = ["bfloat16", "float16", "float32", "float64", "complex64", "complex128"]
# the default run keeps the low-precision float that is most often promoted by accident (bfloat16), the
# default float32 and the complex types; float16 and float64 rows (same code paths, ~25 s of compiles) run
# with -m slow
_DTYPES_SLOW = {"float16", "float64"}


@by_entry
@pytest.mark.parametrize("dtype", [pytest.param(d, marks=pytest.mark.slow) if d in _DTYPES_SLOW else d
                                   for d in DTYPES])
def test_state_dtypes_are_stable_inside_cond(entry, dtype):
    if "complex" in dtype and not entry.supports_complex:
        pytest.skip("the registry entry declares no complex support")
    with jax.enable_x64(dtype in ("float64", "complex128")):
        tx = entry.build()
        params = _init_params(jnp.dtype(dtype))
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            value, grads = _value_and_grad(params)
            updates, new_state = tx.update(grads, state, params, **_extra(entry, value))
            # both branches must have identical types: the state may not change shape, dtype or weak type
            kept = jax.lax.cond(value > 0, lambda s: new_state, lambda s: s, state)
            return updates, new_state, kept

        updates, new_state, kept = step(params, state)
        updates2, new_state2, _ = step(optax.apply_updates(params, updates), new_state)
        assert _avals(new_state) == _avals(state), "state shapes/dtypes/weak types changed after update"
        assert _avals(new_state2) == _avals(state)
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
            assert u.dtype == p.dtype, f"update dtype {u.dtype} for {p.dtype} params"
            assert np.all(np.isfinite(np.asarray(u).astype(np.complex128 if "complex" in dtype else np.float64)))


# --------------------------------------------------------------------------------------------------
# convergence (parabola and Rosenbrock, 10,000 jitted steps)
# --------------------------------------------------------------------------------------------------


def _parabola(dtype):
    x0 = jnp.asarray([-1.0, 10.0, 1.0], dtype)
    target = jnp.asarray([1.0, -1.0, 1.0], dtype)
    return x0, target, lambda x: jnp.sum(jnp.abs(x - target) ** 2)


def _rosenbrock(dtype):
    a, b = 1.0, 100.0
    x0 = jnp.asarray([0.0, 0.0], dtype)
    target = jnp.asarray([a, a**2], dtype)
    return x0, target, lambda p: jnp.abs(a - p[0]) ** 2 + b * jnp.abs(p[1] - p[0] ** 2) ** 2


PROBLEMS = {"parabola": _parabola, "rosenbrock": _rosenbrock}


@by_entry
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_converges(entry, problem, dtype):
    if problem not in entry.converge:
        pytest.skip(f"the registry entry claims no convergence settings for {problem}")
    if "complex" in dtype and not entry.supports_complex:
        pytest.skip("the registry entry declares no complex support")
    x0, target, fn = PROBLEMS[problem](jnp.dtype(dtype))
    tx = entry.build(**dict(entry.converge[problem]))

    @jax.jit
    def solve(x):
        def body(_, carry):
            x, state = carry
            value, grad = jax.value_and_grad(fn)(x)
            updates, state = tx.update(jnp.conj(grad), state, x, **_extra(entry, value))
            return optax.apply_updates(x, updates), state

        return jax.lax.fori_loop(0, 10_000, body, (x, tx.init(x)))[0]

    x = solve(x0)
    np.testing.assert_allclose(np.asarray(x), np.asarray(target), atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------------------------------------
# vmap over learning rates, abstract init, MultiSteps
# --------------------------------------------------------------------------------------------------


@by_entry_others_slow
def test_vmap_over_learning_rates(entry):
    if "learning_rate" not in inspect.signature(entry.factory).parameters:
        pytest.skip("the factory has no learning_rate argument")
    lrs = jnp.asarray([1e-3, 3e-3, 1e-2, 3e-2], jnp.float32)

    def run(lr):
        tx = entry.build(learning_rate=lr)
        params = _init_params()
        params, _ = _run(_step_fn(entry, tx), params, tx.init(params), 3)
        return params

    batched = jax.jit(jax.vmap(run))(lrs)
    single = jax.jit(run)
    for i, lr in enumerate(lrs):
        one = single(lr)
        jax.tree.map(lambda b, s: np.testing.assert_allclose(np.asarray(b[i]), np.asarray(s), rtol=2e-6,
                                                             atol=1e-7), batched, one)
    leaves, init = jax.tree.leaves(batched), jax.tree.leaves(_init_params())
    moved = any(not np.array_equal(np.asarray(x[-1]), np.asarray(p)) for x, p in zip(leaves, init))
    if moved:  # an optimizer may legitimately hold still for its first steps (e.g. collecting statistics)
        assert any(not np.allclose(np.asarray(x[0]), np.asarray(x[-1])) for x in leaves), "lr had no effect"


@by_entry
def test_abstract_init_matches_concrete(entry):
    tx = entry.build()
    params = _init_params()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    concrete = tx.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(concrete)
    for s, c in zip(jax.tree.leaves(shapes), jax.tree.leaves(concrete)):
        assert (s.shape, s.dtype) == (c.shape, c.dtype)


@by_entry_others_slow
def test_multisteps_non_boundary_updates_are_zero(entry):
    tx = optax.MultiSteps(entry.build(), every_k_schedule=4)
    step = jax.jit(_step_fn(entry, tx))
    params = _init_params()
    state = tx.init(params)
    for i in range(1, 9):
        params, state, updates = step(params, state)
        for u in jax.tree.leaves(updates):
            u = np.asarray(u)
            assert np.all(np.isfinite(u))
            if i % 4:
                assert np.all(u == 0), f"mini-step {i} is not a boundary but produced a non-zero update"


# --------------------------------------------------------------------------------------------------
# sharding over 8 forced host devices (a subprocess: the device count is fixed before jax starts)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [
    pytest.param(ONE_PER_FAMILY, id="one_per_family"),
    pytest.param(tuple(e.name for e in ENTRIES if e.name not in ONE_PER_FAMILY), id="the_others",
                 marks=pytest.mark.slow)])
def test_sharded_params_match_single_device(names):
    """Each entry of ``names``, run by ``sharding_check.py`` over 8 forced host devices, matches its
    single-device run.

    One subprocess per group of entries (the device count is fixed before jax starts; ~3 s per entry):
    one entry per family in the default suite, the others with -m slow.
    """
    script = Path(__file__).with_name("sharding_check.py")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), *names], capture_output=True, text=True, env=env, timeout=900,
                          cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(reports) == sorted(names)
    failures = {name: r["detail"] for name, r in reports.items()
                if not (r["devices"] == 8 and r["types_equal"] and r["max_diff"] <= 1e-6)}
    assert not failures, failures


# --------------------------------------------------------------------------------------------------
# save -> restore -> resume
# --------------------------------------------------------------------------------------------------


def _roundtrip(method, state, template):
    from flax import serialization

    if method == "flax_state_dict":
        d = serialization.to_state_dict(state)
        d = jax.tree.map(np.asarray, d)  # detach from the live arrays
        return serialization.from_state_dict(template, d)
    if method == "msgpack":
        return serialization.from_bytes(template, serialization.to_bytes(state))
    if method == "pickle":
        return pickle.loads(pickle.dumps(jax.tree.map(np.asarray, state)))
    raise ValueError(method)


@by_entry
@pytest.mark.parametrize("method", ["flax_state_dict", "msgpack", "pickle"])
def test_save_restore_resume_is_bitwise_identical(entry, method):
    tx, step = _compiled_step(entry.name)
    params0 = _init_params()
    full_params, full_state = _run(step, params0, tx.init(params0), 6)
    params, state = _run(step, params0, tx.init(params0), 3)
    template = tx.init(jax.tree.map(jnp.zeros_like, params0))
    restored = _roundtrip(method, state, template)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    restored = jax.tree.map(lambda r, t: jnp.asarray(r, t.dtype), restored, template)
    params, state = _run(step, jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params), restored, 3)
    _assert_trees_equal(params, full_params, "params after resume")
    _assert_trees_equal(state, full_state, "state after resume")


# --------------------------------------------------------------------------------------------------
# grad_mask (torch's "parameter without gradient")
# --------------------------------------------------------------------------------------------------


def _paths_of(tree, key):
    """Flattened leaves of ``tree`` under a dict key ``key`` (per-param state of that param)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [leaf for path, leaf in flat if any(getattr(p, "key", None) == key for p in path)]


@by_entry
def test_grad_mask_false_leaf_is_untouched(entry):
    if not entry.supports_grad_mask:
        pytest.skip("the registry entry does not declare grad_mask support")
    tx, step = _compiled_step(entry.name)
    params, state = _run(step, _init_params(), tx.init(_init_params()), 2)
    mask = {"w": jnp.asarray(True), "b": jnp.asarray(False)}

    @jax.jit
    def masked(params, state):
        return _update(entry, tx, params, state, grad_mask=mask), _update(entry, tx, params, state)

    (updates, new_state), (free_updates, _) = masked(params, state)
    assert np.all(np.asarray(updates["b"]) == 0), "masked leaf moved"
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(free_updates["w"]))
    before, after = _paths_of(state, "b"), _paths_of(new_state, "b")
    assert before, "no per-parameter state found for the masked leaf"
    for x, y in zip(before, after):
        assert np.array_equal(np.asarray(x), np.asarray(y)), "masked leaf's state changed"


# --------------------------------------------------------------------------------------------------
# flat layout: padding invariance and equality with the pytree layout
# --------------------------------------------------------------------------------------------------


# Segment i is the pytree's leaf i (dict leaves flatten in sorted key order): optimizers with per-tensor
# randomness (EnhancedSGD's noise keys) draw tensor i's numbers for segment i.
FLAT_ORDER = sorted(SHAPES)


def _pack(tree, layout):
    buf = jnp.zeros((layout.total,), next(iter(tree.values())).dtype)
    for k, off, num in zip(FLAT_ORDER, layout.offsets, layout.numels):
        buf = buf.at[off:off + num].set(tree[k].reshape(-1))
    return buf


def _unpack(buf, layout):
    return {k: buf[off:off + num].reshape(SHAPES[k])
            for k, off, num in zip(FLAT_ORDER, layout.offsets, layout.numels)}


@by_entry
def test_flat_layout_padding_and_equivalence(entry):
    """float64, so that whole-buffer reductions (summed in another order in the flat layout) agree to rounding."""
    if not entry.supports_segments:
        pytest.skip("the registry entry does not support the flat layout")
    layout = FlatLayout.from_shapes([SHAPES[k] for k in FLAT_ORDER])
    padding = np.asarray(layout.seg_ids) == layout.num_tensors
    assert padding.any()
    with jax.enable_x64(True):
        tree_tx, flat_tx = entry.build(), entry.build(segments=layout)
        tree_step = jax.jit(_step_fn(entry, tree_tx))

        @jax.jit
        def flat_step(flat, state):
            value, grads = jax.value_and_grad(lambda f: _loss(_unpack(f, layout)))(flat["flat"])
            updates, state = flat_tx.update({"flat": grads}, state, flat, **_extra(entry, value))
            return optax.apply_updates(flat, updates), state, updates

        params = _init_params(jnp.float64)
        flat = {"flat": _pack(params, layout)}
        tree_state, flat_state = tree_tx.init(params), flat_tx.init(flat)
        for _ in range(4):
            params, tree_state, _ = tree_step(params, tree_state)
            flat, flat_state, updates = flat_step(flat, flat_state)
            assert np.all(np.asarray(updates["flat"])[padding] == 0), "padding received a non-zero update"
            assert np.all(np.asarray(flat["flat"])[padding] == 0)
            unpacked = _unpack(flat["flat"], layout)
            for k in SHAPES:
                np.testing.assert_allclose(np.asarray(unpacked[k]), np.asarray(params[k]), rtol=1e-12, atol=1e-14)
