r"""EnhancedSGD's per-tensor work as segment operations over flat buffers (both layouts share it).

EnhancedSGD's step reduces over every gradient element (sum, range, finiteness, variance, histogram) and
over each tensor (centering means), then runs an elementwise pass. Written per leaf, that is a handful of
reductions, a scatter and a long elementwise kernel *per tensor*: XLA:CPU compiles each separately, so the
first step took 23 s on 25 leaves and grew faster than linearly. Here every tensor of one dtype lives in
one flat buffer (a :class:`~jaxopt_suite._common.FlatLayout`: segment ``i`` = tensor ``i``, zero padding in
the dead segment), and each of those operations is one kernel over the buffer whatever the number of
tensors. The pytree layout packs its leaves into such buffers (one per dtype) and unpacks the results; the
flat layout (``segments=``) is used as given. Both therefore run the same operations on the same values.

Reduction order (why the two layouts agree bit for bit). A per-tensor sum is formed as

.. code-block:: text

    chunk sums   c_k = ((x₀ + x₁) + (x₂ + x₃)) + ((x₄ + x₅) + (x₆ + x₇))   over the 8 elements of chunk k
    tensor sum   S_i = Σ_k c_k  over the chunks of segment i, in increasing k (a sorted scatter-add)

with padding and masked elements set to 0 before the chunk sums. Chunks start at the segment's offset
(all offsets are multiples of 8), and a chunk holding no element of the tensor belongs to the dead segment,
so ``S_i`` depends only on the tensor's own elements, not on where the layout puts it or how much padding
follows it. The explicit pairwise adds fix the order inside a chunk (XLA does not reassociate floating
adds); the scatter-add applies its sorted updates in order on XLA:CPU. A layout whose offsets are not all
multiples of 8 uses chunks of 1 (plain sequential segment sums): still deterministic, but then it agrees
with the pytree layout (which always packs with 8-element alignment) only up to rounding.
Cross-tensor totals are ``jnp.sum`` over the vector of per-tensor values (one entry per tensor, in leaf
order), the same reduction in both layouts. Ranges, finiteness and histogram counts are exact in any order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import _common as C

CHUNK = 8  # elements per chunk of the per-tensor sums (a divisor of every bridge alignment: 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Pack:
    """One flat buffer: the tensors ``tensors`` (global tensor indices, in segment order) of one dtype."""

    layout: C.FlatLayout
    tensors: tuple[int, ...]
    dtype: Any

    @property
    def size(self) -> int:
        return self.layout.num_tensors


ALIGN_BYTES = 64  # the torch bridge's segment granule (torch_bridge.dlpack.ALIGN_BYTES)


def align_elements(dtype: Any) -> int:
    """Elements per 64-byte granule (at least :data:`CHUNK`): the pytree layout packs as the bridge does, so
    that both compile the same loops over buffers of the same size."""
    return max(CHUNK, ALIGN_BYTES // jnp.dtype(dtype).itemsize)


def plan_packs(leaves: Sequence[jax.Array]) -> list[Pack]:
    """The pytree layout's buffers: the leaves grouped by dtype (first appearance), 64-byte aligned."""
    groups: dict = {}
    for i, g in enumerate(leaves):
        groups.setdefault(jnp.dtype(g.dtype), []).append(i)
    return [Pack(C.FlatLayout.from_shapes([tuple(leaves[i].shape) for i in idx],
                                          align_elements=align_elements(dtype)),
                 tuple(idx), dtype) for dtype, idx in groups.items()]


def pack(arrays: Sequence[jax.Array], p: Pack) -> jax.Array:
    """The arrays of ``p``'s tensors (indexed by global tensor index) as one zero-padded flat buffer."""
    parts = []
    for i, num, padded in zip(p.tensors, p.layout.numels, p.layout.padded):
        parts.append(jnp.ravel(arrays[i]).astype(p.dtype))
        if padded > num:
            parts.append(jnp.zeros((padded - num,), p.dtype))
    if not parts:
        return jnp.zeros((0,), p.dtype)
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def unpack(flat: jax.Array, p: Pack, shapes: Sequence[Sequence[int]]) -> list[jax.Array]:
    """The tensors of ``p`` cut out of ``flat`` (in segment order), each reshaped to ``shapes[j]``."""
    return [flat[off:off + num].reshape(tuple(shape))
            for off, num, shape in zip(p.layout.offsets, p.layout.numels, shapes)]


@dataclasses.dataclass(frozen=True)
class Static:
    """NumPy constants of one layout (built once per layout, at trace time)."""

    seg_ids: np.ndarray  # int32[total]: segment of every element (dead = num_tensors)
    offsets: np.ndarray  # int32[num_segments]: offset of each segment (0 for the dead one)
    numels: np.ndarray  # int32[num_segments]: elements of each tensor (0 for the dead one)
    chunk: int  # CHUNK, or 1 where the layout's offsets are not all multiples of CHUNK
    chunk_seg: np.ndarray  # int32[total // chunk]: segment of each chunk (dead if none of its elements)
    centre_kind: np.ndarray  # int32[num_segments]: 0 none, 1 per slice, 2 whole tensor
    slice_base: np.ndarray  # int32[num_segments]: first slice id of a per-slice-centred tensor
    slice_stride: np.ndarray  # int32[num_segments]: elements between consecutive entries of the kept axis
    slice_dim: np.ndarray  # int32[num_segments]: length of the kept axis
    slice_count: np.ndarray  # int32[num_slices]: elements of each slice
    num_slices: int


@functools.lru_cache(maxsize=64)
def static_of(layout: C.FlatLayout, centering: Any, axis: int) -> Static:
    """The constants of ``layout`` for ``gradient_centering=centering`` and ``centering_axis=axis``."""
    n, total = layout.num_tensors, layout.total
    offsets = np.zeros(n + 1, np.int32)
    offsets[:n] = layout.offsets
    numels = np.zeros(n + 1, np.int32)
    numels[:n] = layout.numels
    aligned = all(o % CHUNK == 0 for o in layout.offsets) and total % CHUNK == 0
    chunk = CHUNK if aligned else 1
    chunk_seg = np.full(total // chunk, n, np.int32)
    for i, (off, num) in enumerate(zip(layout.offsets, layout.numels)):
        chunk_seg[off // chunk: (off + num + chunk - 1) // chunk] = i  # chunks holding an element of i
    kind = np.zeros(n + 1, np.int32)
    base = np.zeros(n + 1, np.int32)
    stride = np.ones(n + 1, np.int32)
    dim = np.ones(n + 1, np.int32)
    counts = []
    for i, num in enumerate(layout.numels):
        shape = tuple(layout.shapes[i]) if layout.shapes else (num,)
        if centering is True and len(shape) >= 2:
            keep = axis % len(shape)
            kind[i], base[i], dim[i] = 1, len(counts), shape[keep]
            stride[i] = math.prod(shape[keep + 1:])
            counts += [num // shape[keep]] * shape[keep]
        elif centering == "all" and num > 1:
            kind[i] = 2
    return Static(layout.seg_ids, offsets, numels, chunk, chunk_seg, kind, base, stride, dim,
                  np.asarray(counts, np.int32), len(counts))


def tensor_sums(x: jax.Array, st: Static, num_segments: int) -> jax.Array:
    """Per-segment sums of ``x`` (zero where not to be counted) in the fixed order of the module docstring."""
    if st.chunk == CHUNK:
        c = x.reshape(-1, CHUNK)
        col = [c[:, j] for j in range(CHUNK)]
        x = ((col[0] + col[1]) + (col[2] + col[3])) + ((col[4] + col[5]) + (col[6] + col[7]))
    return jax.ops.segment_sum(x, jnp.asarray(st.chunk_seg), num_segments=num_segments, indices_are_sorted=True)


def range_and_finite(g: jax.Array, included: Optional[jax.Array]):
    """``(lo, hi, all_finite)`` over the elements of ``g`` where ``included`` (all when None), one pass.

    As :func:`entropy.leaf_summary`: integer keys ``b ^ ((b >> w−1) & max)`` order finite floats like the
    floats, so integer min/max give the exact float min/max, and ``max(b & max) < bits(+inf)`` says that
    every element is finite. Excluded elements contribute the neutral keys. ``lo > hi`` when none is included.
    """
    itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[jnp.dtype(g.dtype).itemsize]
    info = jnp.iinfo(itype)
    bits = jax.lax.bitcast_convert_type(g, itype)
    key = bits ^ ((bits >> (info.bits - 1)) & info.max)
    magnitude = bits & info.max
    kmin_in, kmax_in, mag_in = key, key, magnitude
    if included is not None:
        kmin_in = jnp.where(included, key, info.max)
        kmax_in = jnp.where(included, key, info.min)
        mag_in = jnp.where(included, magnitude, 0)

    def combine(a, b):
        return jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1]), jnp.maximum(a[2], b[2])

    init = (jnp.asarray(info.max, itype), jnp.asarray(info.min, itype), jnp.zeros((), itype))
    kmin, kmax, mag = jax.lax.reduce((kmin_in, kmax_in, mag_in), init, combine, (0,))

    def from_key(k):
        return jax.lax.bitcast_convert_type(k ^ ((k >> (info.bits - 1)) & info.max), g.dtype)

    inf_bits = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, g.dtype), itype)
    return from_key(kmin), from_key(kmax), mag < inf_bits


def histogram_table(g: jax.Array, included: Optional[jax.Array], bins: int, lo: jax.Array,
                    factor: jax.Array) -> jax.Array:
    """int32 counts (``bins``) of the included elements of the flat ``g``, counted in pairs as in
    :func:`entropy.histogram_counts` (excluded elements go to the padding bin ``bins``, not counted)."""
    u = (g.astype(jnp.float32) - lo) * factor
    idx = jnp.clip(jnp.floor(u), 0, bins - 1).astype(jnp.int32)
    if included is not None:
        idx = jnp.where(included, idx, bins)
    if idx.shape[0] % 2:
        idx = jnp.concatenate([idx, jnp.full((1,), bins, jnp.int32)])
    side = bins + 1
    pairs = idx.reshape(-1, 2)
    cell = pairs[:, 0] * side + pairs[:, 1]
    table = jnp.zeros((side * side,), jnp.int32).at[cell].add(1, mode="promise_in_bounds")
    table = table.reshape(side, side)
    return (jnp.sum(table, axis=1) + jnp.sum(table, axis=0))[:bins]
