"""EnhancedSGD's flat layout (``segments=FlatLayout``): bit-identical to the pytree layout, and the bridge uses it.

Both layouts run the same segment operations (jaxopt_suite/enhanced_sgd/flat.py), so the comparisons below
are exact (``np.array_equal``), not within a tolerance: any difference is a bug of the flat code (a
per-tensor quantity reduced in another order, a noise key or index off by one, padding leaking in).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite._common import FlatLayout
from jaxopt_suite.enhanced_sgd import enhanced_sgd, find_enhanced_state

# matrices (centred per output slice), a 3-D tensor, a vector, a scalar and a one-element vector
SHAPES = [(7, 5), (13,), (), (3, 4, 2), (1,), (6, 3)]


def _flatten(arrays, layout, dtype):
    out = np.zeros(layout.total, dtype)
    for x, off, num in zip(arrays, layout.offsets, layout.numels):
        out[off:off + num] = np.ravel(np.asarray(x))
    return jnp.asarray(out)


def _split(flat, layout):
    flat = np.asarray(flat)
    return [flat[off:off + num].reshape(shape) for off, num, shape in zip(layout.offsets, layout.numels, layout.shapes)]


def _assert_same(tree_leaves, flat, layout, what):
    for i, (a, b) in enumerate(zip(tree_leaves, _split(flat, layout))):
        assert np.array_equal(np.asarray(a), b), f"{what}: tensor {i} differs (max {np.max(np.abs(a - b))})"
        assert np.all(np.asarray(flat)[np.asarray(layout.seg_ids) == layout.num_tensors] == 0), f"{what}: padding"


def _run_both(dtype, steps, align, mask_step=None, **kwargs):
    """``steps`` updates of the pytree and the flat layout on the same gradients and losses; every step's
    parameters, momentum, retained average, lookahead slow weights and controller fields compared exactly."""
    rng = np.random.default_rng(0)
    layout = FlatLayout.from_shapes(SHAPES, align)
    params = [jnp.asarray(rng.standard_normal(s).astype(dtype)) for s in SHAPES]
    tx_tree = enhanced_sgd(learning_rate=0.05, **kwargs)
    tx_flat = enhanced_sgd(learning_rate=0.05, segments=layout, **kwargs)
    tree, flat = params, [_flatten(params, layout, dtype)]
    s_tree, s_flat = tx_tree.init(tree), tx_flat.init(flat)
    up_tree = jax.jit(lambda g, s, p, v, m: tx_tree.update(g, s, p, value=v, grad_mask=m))
    up_flat = jax.jit(lambda g, s, p, v, m: tx_flat.update(g, s, p, value=v, grad_mask=m))
    spiked = False
    for i in range(steps):
        grads = [rng.standard_normal(s).astype(dtype) * (1 + i) for s in SHAPES]
        # a loss spike at step 6 (spike handling and the controller's reward both see it)
        loss = jnp.asarray(1.0 / (i + 1) + (3.0 if i == 6 else 0.0), find_enhanced_state(s_tree).grad_var.dtype)
        m_tree = m_flat = None
        if i == mask_step:  # tensor 1 has no gradient at this step
            keep = np.ones(len(SHAPES), bool)
            keep[1] = False
            m_tree = [np.bool_(k) for k in keep]
            m_flat = [np.append(keep, True)]
        u_tree, s_tree = up_tree([jnp.asarray(g) for g in grads], s_tree, tree, loss, m_tree)
        u_flat, s_flat = up_flat([_flatten(grads, layout, dtype)], s_flat, flat, loss, m_flat)
        tree, flat = optax.apply_updates(tree, u_tree), optax.apply_updates(flat, u_flat)
        _assert_same(u_tree, u_flat[0], layout, f"step {i} update")
        _assert_same(tree, flat[0], layout, f"step {i} params")
        a, b = find_enhanced_state(s_tree), find_enhanced_state(s_flat)
        _assert_same(a.momentum_buffer, b.momentum_buffer[0], layout, f"step {i} momentum")
        if a.retained is not None:
            _assert_same(a.retained, b.retained[0], layout, f"step {i} retained")
        if hasattr(s_tree, "slow"):
            _assert_same(s_tree.slow, s_flat.slow[0], layout, f"step {i} slow weights")
        for name in a._fields:
            if name not in ("momentum_buffer", "retained"):
                x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
                assert np.array_equal(x, y, equal_nan=True), f"step {i} {name}: {x} != {y}"
        spiked |= bool(a.last_spike)
    return a, spiked


@pytest.mark.parametrize("precision", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_flat_layout_is_bit_identical_to_the_pytree_layout(precision):
    """Defaults (centering per slice, clipping, noise, retention, lookahead k=5) with a loss, 12 steps; the
    bridge's alignment (64 bytes), one step with a tensor masked out."""
    ctx = jax.enable_x64(True) if precision == "float64" else contextlib.nullcontext()
    with ctx:
        dtype = np.dtype(precision)
        state, spiked = _run_both(dtype, 12, 64 // dtype.itemsize, mask_step=4)
    assert spiked and int(state.count) == 12 and int(state.retained_count) > 0
    assert float(state.grad_var) > 0  # clipping engaged from step 2 on


@pytest.mark.slow
def test_flat_layout_bit_identical_whole_tensor_centering_other_alignment():
    """Whole-tensor centering, kept axis −1 irrelevant, 8-element alignment (not the bridge's)."""
    state, _ = _run_both(np.float32, 6, 8, gradient_centering="all", lookahead_k=2)
    assert int(state.count) == 6


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(centering_axis=-1), dict(apply_noise=False, gradient_retention=False),
                                    dict(adaptive_momentum=False, gradient_clipping=False, lookahead_k=0)])
def test_flat_layout_bit_identical_other_options(kwargs):
    _run_both(np.float32, 8, 16, mask_step=3, **kwargs)


def test_mixed_dtype_tree_matches_per_dtype_buffers():
    """A pytree of two dtypes packs one buffer per dtype; results are finite and bfloat16 leaves stay bfloat16."""
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.arange(3.0, dtype=jnp.float32)}
    tx = enhanced_sgd(learning_rate=0.1)
    u, s = jax.jit(lambda g, s: tx.update(g, s, params, value=jnp.float32(1.0)))(
        {"w": jnp.full((4, 3), 0.5, jnp.bfloat16) * jnp.arange(3, dtype=jnp.bfloat16), "b": jnp.ones(3)},
        tx.init(params))
    assert u["w"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert float(jnp.max(jnp.abs(u["w"].astype(jnp.float32)))) > 0


def test_flat_layout_argument_errors():
    layout = FlatLayout.from_shapes(SHAPES)
    with pytest.raises(ValueError, match="segments"):
        enhanced_sgd(segments="flat")
    with pytest.raises(ValueError, match="shapes"):
        enhanced_sgd(segments=FlatLayout(layout.offsets, layout.numels, layout.padded))  # no shapes
    tx = enhanced_sgd(segments=layout)
    flat = [jnp.zeros(layout.total)]
    state = tx.init(flat)
    with pytest.raises(ValueError, match="one flat buffer"):
        tx.update([jnp.zeros(layout.total - 1)], state, flat)
    with pytest.raises(ValueError, match="grad_mask"):
        tx.update(flat, state, flat, grad_mask=[np.ones(layout.num_tensors, bool)])
    with pytest.raises(ValueError, match="learning_rate"):
        enhanced_sgd(learning_rate=[0.1, 0.2], segments=layout).update(flat, state, flat)
