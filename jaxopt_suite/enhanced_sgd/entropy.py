"""Shannon entropy of the empirical distribution of all gradient elements, computed on device.

All elements of a pytree (every leaf together) are binned into ``B`` equal-width bins spanning
``[min, max]`` of the elements::

    u   = (g − lo) · (B / (hi − lo))              (float32; the factor is computed once)
    idx = clip(floor(u), 0, B − 1)
    p_b = count_b / N                             (a histogram of probabilities, not of densities)
    H   = −Σ_{p_b > 0} p_b ln p_b,   H_norm = H / ln B ∈ [0, 1]

``H = 0`` when all elements are equal (``hi ≤ lo``). Because the bins follow the range of the data,
multiplying every element by ``c > 0`` leaves the histogram unchanged (exactly for powers of two, up to
rounding at bin edges otherwise). Counts are accumulated per leaf with an integer scatter-add (of pairs
of elements, see :func:`histogram_counts`), so nothing is concatenated and no value leaves the device.

References:
  Shannon, "A Mathematical Theory of Communication", Bell System Technical Journal 27, 1948.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


def controller_dtype() -> Any:
    """float64 when ``jax_enable_x64`` is on (as Python floats are), else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def explicit_spec(x: Any = None):
    """Under a mesh with explicit axes: ``x``'s PartitionSpec (replicated ``P()`` when ``x`` is None).

    ``None`` outside such a mesh. Scatters into small replicated arrays and index arrays built to match a
    sharded gradient need it there (JAX cannot infer those shardings without collectives).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return None
    if x is None:
        return jax.sharding.PartitionSpec()
    return jax.typeof(x).sharding.spec


def _leaf_masks(leaves: Sequence[jax.Array], leaf_mask: Optional[Sequence[Any]]):
    if leaf_mask is None:
        return [None] * len(leaves)
    return [None if m is None else jnp.asarray(m, bool) for m in leaf_mask]


def leaf_summary(g: jax.Array, keep_axis: Optional[int] = None):
    """``(sum, min, max, all_finite, slice_sums)`` of one leaf in a single pass over its elements.

    One variadic reduction over the float values and their integer bit patterns: ``b ^ ((b >> w−1) & max)``
    orders finite floats like the floats themselves (so integer min/max give the float min/max without
    NaN-propagating float comparisons), and ``max(b & max) < bits(+inf)`` says that every element is finite.
    The sum is in at least float32; min and max are exact values of ``g`` (meaningless when not finite).

    ``slice_sums`` is ``None`` unless ``keep_axis`` is given (a leaf with ``ndim ≥ 2``): then the pass
    reduces every other axis first, ``slice_sums`` holds the sum of each slice along ``keep_axis``
    (Gradient Centralization's means come from the same pass), and the leaf's sum is their sum.
    """
    work = jnp.promote_types(g.dtype, jnp.float32)
    itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[jnp.dtype(g.dtype).itemsize]
    info = jnp.iinfo(itype)
    bits = jax.lax.bitcast_convert_type(g, itype)
    key = bits ^ ((bits >> (info.bits - 1)) & info.max)
    magnitude = bits & info.max

    def combine(x, y):
        return x[0] + y[0], jnp.minimum(x[1], y[1]), jnp.maximum(x[2], y[2]), jnp.maximum(x[3], y[3])

    init = (jnp.zeros((), work), jnp.asarray(info.max, itype), jnp.asarray(info.min, itype), jnp.zeros((), itype))
    axes = tuple(a for a in range(g.ndim) if keep_axis is None or a != keep_axis % g.ndim)
    total, kmin, kmax, mag = jax.lax.reduce((g.astype(work), key, key, magnitude), init, combine, axes)
    slice_sums = None
    if keep_axis is not None:
        slice_sums = total
        total, kmin, kmax, mag = jnp.sum(total), jnp.min(kmin), jnp.max(kmax), jnp.max(mag)

    def from_key(k):
        return jax.lax.bitcast_convert_type(k ^ ((k >> (info.bits - 1)) & info.max), g.dtype)

    inf_bits = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, g.dtype), itype)
    return total, from_key(kmin), from_key(kmax), mag < inf_bits, slice_sums


def value_range(leaves: Sequence[jax.Array], leaf_mask: Optional[Sequence[Any]] = None, summaries=None):
    """``(lo, hi)`` in float32 over the elements of ``leaves`` (masked-out leaves excluded)."""
    los, his = [], []
    if summaries is None:
        summaries = [leaf_summary(g) for g in leaves]
    for (_, lo, hi, _, _), m in zip(summaries, _leaf_masks(leaves, leaf_mask)):
        lo = lo.astype(jnp.float32)
        hi = hi.astype(jnp.float32)
        if m is not None:
            lo = jnp.where(m, lo, jnp.inf)
            hi = jnp.where(m, hi, -jnp.inf)
        los.append(lo)
        his.append(hi)
    return jnp.min(jnp.stack(los)), jnp.max(jnp.stack(his))


def histogram_counts(
    leaves: Sequence[jax.Array],
    bins: int,
    lo: jax.Array,
    hi: jax.Array,
    leaf_mask: Optional[Sequence[Any]] = None,
) -> jax.Array:
    """int32 counts of the elements of ``leaves`` in ``bins`` equal bins over ``[lo, hi]``.

    Bin ``b`` holds ``b ≤ (g − lo)·B/(hi − lo) < b + 1``; the maximum falls into the last bin. Leaves whose
    mask entry is False contribute nothing. When ``hi ≤ lo`` every element lands in bin 0.
    """
    width = hi - lo
    factor = jnp.where(width > 0, jnp.float32(bins) / jnp.where(width > 0, width, 1.0), 0.0)

    def bin_index(x):
        u = (x.astype(jnp.float32) - lo) * factor
        return jnp.clip(jnp.floor(u), 0, bins - 1).astype(jnp.int32)

    spec = explicit_spec()
    if spec is not None:  # sharded leaves under an explicit mesh: one scatter-add per element
        counts = jnp.zeros((bins,), jnp.int32)
        for g, m in zip(leaves, _leaf_masks(leaves, leaf_mask)):
            idx = bin_index(g.ravel())
            ones = jnp.ones((), jnp.int32) if m is None else m.astype(jnp.int32)
            counts = counts.at[idx].add(jnp.broadcast_to(ones, idx.shape), mode="promise_in_bounds",
                                        out_sharding=spec)
        return counts
    # XLA:CPU runs a scatter as a scalar loop, so its cost is per scattered element. Elements are therefore
    # counted in pairs: the pair (i, j) of bins goes to cell i·(B+1) + j of a (B+1)² table (bin B pads a
    # leaf of odd size), half as many scatter-adds; the counts are the table's row sums plus its column
    # sums, the same integers as counting the elements one by one.
    side = bins + 1
    table = jnp.zeros((side * side,), jnp.int32)
    for g, m in zip(leaves, _leaf_masks(leaves, leaf_mask)):
        flat = g.ravel()
        if flat.size % 2:
            idx = jnp.concatenate([bin_index(flat), jnp.full((1,), bins, jnp.int32)]).reshape(-1, 2)
            cell = idx[:, 0] * side + idx[:, 1]
        else:
            pairs = flat.reshape(-1, 2)
            cell = bin_index(pairs[:, 0]) * side + bin_index(pairs[:, 1])
        ones = jnp.ones((), jnp.int32) if m is None else m.astype(jnp.int32)
        table = table.at[cell].add(jnp.broadcast_to(ones, cell.shape), mode="promise_in_bounds")
    table = table.reshape(side, side)
    return (jnp.sum(table, axis=1) + jnp.sum(table, axis=0))[:bins]


def entropy_from_counts(counts: jax.Array, total: jax.Array, dtype: Any = None):
    """``(H, H / ln B)`` of the probabilities ``counts / total`` (empty bins contribute 0)."""
    dtype = controller_dtype() if dtype is None else dtype
    bins = counts.shape[0]
    p = counts.astype(dtype) / jnp.maximum(jnp.asarray(total, dtype), 1)
    safe = jnp.where(p > 0, p, 1)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0))
    return h, h / jnp.log(jnp.asarray(bins, dtype))


def gradient_entropy(
    tree: PyTree,
    bins: int = 100,
    *,
    leaf_mask: Optional[Sequence[Any]] = None,
    dtype: Any = None,
):
    """Entropy ``(H, H_norm)`` of the histogram of every element of ``tree`` (see the module docstring).

    Args:
      tree: a pytree of real arrays (the gradients); all leaves form one distribution.
      bins: number of bins ``B ≥ 2`` (static).
      leaf_mask: optional list (one per leaf, in ``tree_leaves`` order) of bool scalars; leaves with False
        are left out (torch's parameters without a gradient).
      dtype: dtype of the result (default: float64 with x64 enabled, else float32).

    Returns:
      ``(H, H_norm)``: the entropy in nats and divided by ``ln B``; both 0 when all elements are equal.
    """
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"Invalid bins: {bins!r}; expected an integer >= 2.")
    leaves = jax.tree.leaves(tree)
    masks = _leaf_masks(leaves, leaf_mask)
    lo, hi = value_range(leaves, masks)
    counts = histogram_counts(leaves, bins, lo, hi, masks)
    total = sum(
        jnp.asarray(g.size, jnp.int32) if m is None else jnp.where(m, g.size, 0).astype(jnp.int32)
        for g, m in zip(leaves, masks)
    )
    h, hn = entropy_from_counts(counts, total, dtype)
    spread = hi > lo
    return jnp.where(spread, h, 0).astype(h.dtype), jnp.where(spread, hn, 0).astype(hn.dtype)
