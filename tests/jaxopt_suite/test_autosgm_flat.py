"""AutoSGM in the flat layout (``segments=FlatLayout``, the torch bridge's path) against the pytree layout.

The same tensors go through both layouts for a few steps (one leaf masked at one step, an empty and a 0-d
tensor included); the flat updates, unpacked, are compared leaf by leaf with the pytree updates.

* Bitwise (``np.array_equal``) where the two compiled programs round identically: heavy ball and Nesterov
  (no per-tensor arithmetic beyond the counts) in every dtype, the moment-normalised step (num_lrc 0) on
  tensors of rank >= 1 in float32/float64, and every configuration in float16. The per-tensor sums are formed in
  a fixed order in both layouts (``tensor_sum``), so reductions are not a source of difference.
* Otherwise within an error model: XLA:CPU contracts the per-tensor scalar arithmetic (N_t = N + 0.9·mean(a),
  the HUBER scalars) into fused multiply-adds, and rewrites a 0-d leaf's divisions as reciprocal products,
  depending on how it fuses each program; each such choice moves the per-tensor step size α by at most one
  rounding, i.e. a relative change of u = eps/2 per operation. Over the 5 closed-loop steps here a few such
  roundings compound through the states (N_t, μ, σ², and the parameters fed back), so the bound used is
  |Δupdate| <= 64·eps·max|update| per leaf (measured: up to about 8 eps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import registry
from jaxopt_suite._common import FlatLayout
from jaxopt_suite.autosgm import autosgm, autosgm_window

SHAPES = {"a": (3, 5), "b": (17,), "c": (), "d": (4, 4, 3), "e": (0,), "f": (64,)}

CONFIGS = {
    "hb": dict(aoptlr=False, beta_i=0.9, eta_i=1.0, debias=False),
    "nag_max": dict(aoptlr=False, beta_i=0.9, gamma_i=0.9 / 1.9, eta_i=1.0, debias=False, maximize=True),
    "adam": dict(num_lrc=0, eps=1e-8, window=autosgm_window(1, spe=5)),
    "adam_eps0": dict(num_lrc=0, eps=0.0),
    "parcor": dict(num_lrc=1, gamma_i=0.5528, weight_decay=1e-3, window=autosgm_window(1, spe=5)),
    "huber_parcor": dict(num_lrc=2, gamma_i=0.55, weight_decay=1e-2, wd_level=1),
    "moment": dict(num_lrc=3, gamma_i=0.5528, window=autosgm_window(1, spe=3, cfact=3, tau=2)),
    "huber": dict(num_lrc=4, eps=1e-8),
    "huber_eps0": dict(num_lrc=4, eps=0.0),
}
DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _bitwise(config: str, dtype: str, leaf: str) -> bool:
    if config in ("hb", "nag_max") or dtype == "float16":
        return True
    return config in ("adam", "adam_eps0") and dtype in ("float32", "float64") and SHAPES[leaf] != ()


def _pack(tree, layout, dtype):
    buf = np.zeros(layout.total, np.dtype(dtype))
    for k, off, num in zip(SHAPES, layout.offsets, layout.numels):
        buf[off:off + num] = np.asarray(tree[k]).reshape(-1)
    return [jnp.asarray(buf)]


def _unpack(flat, layout):
    buf = np.asarray(flat[0])
    return {k: buf[off:off + num].reshape(shape)
            for (k, shape), off, num in zip(SHAPES.items(), layout.offsets, layout.numels)}


def _run_both(kwargs, dtype, layout, steps=5, masked_step=2):
    """Yields (step, tree updates, unpacked flat updates, flat updates) for ``steps`` closed-loop steps."""
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
    tree_tx, flat_tx = autosgm(**kwargs), autosgm(segments=layout, **kwargs)
    flat_params = _pack(params, layout, dtype)
    tree_state, flat_state = tree_tx.init(params), flat_tx.init(flat_params)
    tree_step = jax.jit(lambda p, s, g, m: tree_tx.update(g, s, p, grad_mask=m))
    flat_step = jax.jit(lambda p, s, g, m: flat_tx.update(g, s, p, grad_mask=m))
    for i in range(steps):
        grads = {k: jnp.asarray(rng.standard_normal(s) * 0.1, dtype) for k, s in SHAPES.items()}
        mask = {k: not (k == "b" and i == masked_step) for k in SHAPES}
        flat_mask = [np.array([mask[k] for k in SHAPES] + [True])]
        updates, tree_state = tree_step(params, tree_state, grads, mask)
        flat_updates, flat_state = flat_step(flat_params, flat_state, _pack(grads, layout, dtype), flat_mask)
        params = optax.apply_updates(params, updates)
        flat_params = optax.apply_updates(flat_params, flat_updates)
        yield i, updates, _unpack(flat_updates, layout), flat_updates, (tree_state, flat_state)


# cheap representatives in the default run (about 4 s each: two compilations); the rest are slow
_FAST = {("adam", "float32"), ("huber_parcor", "float64"), ("nag_max", "bfloat16")}
CASES = [pytest.param(c, d, marks=() if (c, d) in _FAST else pytest.mark.slow) for c in CONFIGS for d in DTYPES]


@pytest.mark.parametrize("config,dtype", CASES)
def test_flat_layout_matches_pytree(config, dtype):
    layout = FlatLayout.from_shapes(list(SHAPES.values()), 64 // jnp.dtype(DTYPES[dtype]).itemsize)
    padding = np.asarray(layout.seg_ids) == layout.num_tensors
    eps = float(jnp.finfo(DTYPES[dtype]).eps)
    with jax.enable_x64(dtype == "float64"):
        for i, tree_u, flat_u, flat_raw, (tree_state, flat_state) in _run_both(CONFIGS[config], DTYPES[dtype],
                                                                              layout):
            assert np.all(np.asarray(flat_raw[0])[padding] == 0), f"step {i}: the padding moved"
            for k in SHAPES:
                a, b = np.asarray(tree_u[k], np.float64), np.asarray(flat_u[k], np.float64)
                if _bitwise(config, dtype, k):
                    assert np.array_equal(a, b, equal_nan=True), f"step {i}, leaf {k}: not bit-identical"
                elif a.size:
                    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
                    bound = 64 * eps * float(np.nanmax(np.abs(a), initial=0.0))
                    assert float(np.nanmax(np.abs(a - b), initial=0.0)) <= bound, f"step {i}, leaf {k}"
            counts = np.array([int(tree_state.count[k]) for k in SHAPES])
            np.testing.assert_array_equal(np.asarray(flat_state.count[0])[:-1], counts)
            assert counts[1] == (i if i >= 2 else i + 1), "the masked leaf's count advanced"


def test_tensor_sum_is_the_same_in_both_layouts_and_not_jnp_sum_order():
    """The fixed-order per-tensor sum: identical per tensor in both layouts; it is a real sum (checked against
    float64), within its error bound (3 + ceil(n/8))·u·Σ|x|."""
    from jaxopt_suite.autosgm.autosgm import tensor_sum

    shapes = [(1,), (7,), (3, 5), (1000,), (4097,), (0,)]
    layout = FlatLayout.from_shapes(shapes, 16)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(s).astype(np.float32) ** 2 for s in shapes]
    buf = np.zeros(layout.total, np.float32)
    for x, off, num in zip(xs, layout.offsets, layout.numels):
        buf[off:off + num] = x.reshape(-1)
    flat = np.asarray(jax.jit(lambda b: tensor_sum(b, layout))(buf))
    u = float(np.finfo(np.float32).eps) / 2
    for i, x in enumerate(xs):
        tree = np.asarray(jax.jit(tensor_sum)(jnp.asarray(x)))
        assert flat[i] == tree, shapes[i]
        exact = float(np.sum(x.astype(np.float64)))
        assert abs(float(tree) - exact) <= (3 + -(-x.size // 8)) * u * exact + 1e-30


@pytest.mark.parametrize("name", [e.name for e in registry.entries() if e.family == "autosgm"])
def test_registry_autosgm_entries_support_segments(name):
    entry = registry.get(name)
    assert entry.supports_segments
    layout = FlatLayout.from_shapes([(3,), (2, 2)])
    tx = entry.build(segments=layout)
    state = tx.init([jnp.zeros(layout.total)])
    assert state.count[0].shape == (layout.num_segments,)
