"""The single place where tensors cross between PyTorch and JAX (DLPack, zero-copy where possible).

Facts this module relies on (CPU, jax 0.10 / torch 2.13):

* ``jax.dlpack.from_dlpack`` on a dense, 64-byte aligned torch tensor of a dtype JAX supports is
  zero-copy: the JAX array aliases the torch storage. Torch writes made later are visible through the
  JAX array, which the flat path relies on for the parameter and gradient buffers (imported once).
  JAX must never donate or write such an imported buffer.
* float64/int64 with ``jax_enable_x64`` off are *silently* copied and downcast, so they are rejected
  here with a ``TypeError`` instead.
* unaligned data pointers are silently copied; strided tensors with gaps cannot be imported at all.
* ``torch.from_dlpack(jax_array)`` is zero-copy and waits until the JAX buffer is ready, so it is also
  the synchronisation point after a step (on CPU the host waits; on CUDA torch's current stream waits).
* On CUDA every import is also a stream handshake, ordered after torch's current stream at the time of
  the import only: :mod:`torch_bridge._cuda` describes the CUDA execution model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch

from . import _cuda

ALIGN_BYTES = 64  # the CPU's alignment; per device (CUDA: 256) see _cuda.align_bytes / segment_align_elements

_X64_HINT = (
    'enable it with jax.config.update("jax_enable_x64", True) before creating the optimizer '
    "(or use float32 parameters)"
)

_SUPPORTED = {
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
}


def x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def check_dtype(tensor: torch.Tensor, what: str = "parameter") -> None:
    """Raise ``TypeError`` for dtypes the bridge cannot hand to JAX without silently changing them."""
    dtype = tensor.dtype
    if dtype.is_complex:
        raise ValueError(
            f"complex {what}s are not supported by the torch bridge; step the real pair "
            "(torch.view_as_real) as a separate float parameter instead."
        )
    if dtype not in _SUPPORTED:
        raise TypeError(
            f"{what} dtype {dtype} is not supported by the torch bridge "
            "(supported: float32, bfloat16, float16, and float64 with JAX x64 enabled)."
        )
    if dtype == torch.float64 and not x64_enabled():
        raise TypeError(f"float64 {what}s need JAX's 64-bit mode, which is off: {_X64_HINT}.")


def is_aligned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s data pointer has the alignment a zero-copy import needs on its device (64 bytes
    on the CPU, 256 on CUDA: :func:`torch_bridge._cuda.align_bytes`)."""
    return tensor.data_ptr() % _cuda.align_bytes(tensor.device) == 0


def align_elements(dtype: torch.dtype) -> int:
    """Number of elements of ``dtype`` in one 64-byte unit (the CPU segment granule; per device:
    :func:`torch_bridge._cuda.segment_align_elements`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, ALIGN_BYTES // itemsize)


def to_jax(tensor: torch.Tensor, *, zero_copy: bool = False) -> jax.Array:
    """Import ``tensor`` (detached) as a JAX array.

    With ``zero_copy=True`` the tensor must be dense and aligned, and the result is checked to alias the
    torch storage (``ValueError`` otherwise). Without it, non-dense tensors are first made contiguous (a
    copy), which is what the simple path wants.
    """
    check_dtype(tensor, "tensor")
    t = tensor.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if zero_copy:
        if not t.is_contiguous():
            raise ValueError("zero-copy import needs a contiguous tensor")
        if not is_aligned(t):
            raise ValueError(f"zero-copy import needs a {_cuda.align_bytes(t.device)}-byte aligned data pointer "
                             f"on {t.device}")
        arr = jax.dlpack.from_dlpack(t)
        if t.numel() and arr.unsafe_buffer_pointer() != t.data_ptr():
            raise ValueError("DLPack import made a copy; the buffer is not shared with torch")
        return arr
    if not t.is_contiguous():
        t = t.contiguous()
    return jax.dlpack.from_dlpack(t)


def to_jax_copy(tensor: torch.Tensor, dtype=None) -> jax.Array:
    """A JAX-owned copy of ``tensor`` (safe to donate), optionally cast to the JAX ``dtype``."""
    arr = jnp.array(to_jax(tensor), copy=True)
    return arr if dtype is None else arr.astype(dtype)


def to_torch(array: jax.Array) -> torch.Tensor:
    """A zero-copy torch view of a JAX array; blocks until the array is computed."""
    return torch.from_dlpack(array)


def scalar_to_torch(array: jax.Array) -> torch.Tensor:
    """A 0-d (or small) JAX array as an independent torch tensor (a copy)."""
    return to_torch(array).clone()


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors use the same storage (possibly at different offsets)."""
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:
        return False
