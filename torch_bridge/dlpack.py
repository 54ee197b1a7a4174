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
* complex tensors (complex64 / complex128) cross as their real view (``torch.view_as_real``: shape
  ``(..., 2)`` of float32 / float64, same storage, zero copy): JAX only ever sees real arrays, and an
  elementwise rule applied to that view is exactly what torch.optim does for a complex parameter (it steps
  ``view_as_real(param)`` with ``view_as_real(grad)`` and real views of its state). :func:`jax_shape` /
  :func:`real_dtype` give the shape and dtype JAX sees; :func:`from_real` turns a real view back.
"""

from __future__ import annotations

from typing import Optional

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

#: complex dtypes the bridge steps as their real view, and the dtype of that view
_COMPLEX_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype JAX sees for a torch ``dtype``: the component dtype of a complex one, else ``dtype``."""
    return _COMPLEX_REAL.get(dtype, dtype)


def jax_shape(tensor: torch.Tensor) -> tuple:
    """The shape JAX sees for ``tensor``: ``(*shape, 2)`` for a complex tensor (its real view), else its shape."""
    return tuple(tensor.shape) + ((2,) if tensor.is_complex() else ())


def real_view(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.view_as_real`` of a complex tensor (a lazily conjugated one is resolved first, a copy, since
    ``view_as_real`` refuses the conjugate bit), the tensor itself otherwise."""
    if not tensor.is_complex():
        return tensor
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    return torch.view_as_real(tensor)


def from_real(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`real_view` for a parameter ``like``: ``view_as_complex`` of the contiguous ``(..., 2)``
    ``tensor`` when ``like`` is complex (a view, same storage), ``tensor`` otherwise."""
    if not like.is_complex():
        return tensor
    return torch.view_as_complex(tensor)


def complex_parameter_error(owner: str, label: str, dtype: torch.dtype, why: str) -> ValueError:
    """The error for a complex parameter an optimizer cannot step as torch.optim would (``why``: the reason)."""
    return ValueError(
        f"{owner}: {label} is complex ({str(dtype).replace('torch.', '')}), which {owner} does not support: "
        f"{why}. Step the real pair instead (a float parameter holding torch.view_as_real of it) if the "
        "rule on the (re, im) components is what you want."
    )


def check_dtype(tensor: torch.Tensor, what: str = "parameter", *, allow_complex: bool = False,
                owner: str = "the torch bridge", label: Optional[str] = None) -> None:
    """Raise for dtypes the bridge cannot hand to JAX without silently changing them.

    ``TypeError`` for unsupported dtypes (float64 / complex128 without JAX's x64 mode too); ``ValueError``
    for a complex tensor unless ``allow_complex`` (callers that step it as its real view pass True),
    naming ``label`` (how errors name the parameter) and ``owner`` (the optimizer class).
    """
    dtype = tensor.dtype
    if dtype.is_complex and not allow_complex:
        raise complex_parameter_error(
            owner, label or f"a {what}", dtype,
            "its rule is not elementwise (it reduces over tensors), so stepping the real view would not be "
            "torch.optim's complex semantics")
    component = real_dtype(dtype)
    if component not in _SUPPORTED or (dtype.is_complex and dtype not in _COMPLEX_REAL):
        raise TypeError(
            f"{what} dtype {dtype} is not supported by the torch bridge "
            "(supported: float32, bfloat16, float16, and float64 with JAX x64 enabled; complex64, and "
            "complex128 with JAX x64 enabled, for elementwise optimizers)."
        )
    if component == torch.float64 and not x64_enabled():
        raise TypeError(f"{str(dtype).replace('torch.', '')} {what}s need JAX's 64-bit mode, which is off: "
                        f"{_X64_HINT}.")


def is_aligned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s data pointer has the alignment a zero-copy import needs on its device (64 bytes
    on the CPU, 256 on CUDA: :func:`torch_bridge._cuda.align_bytes`)."""
    return tensor.data_ptr() % _cuda.align_bytes(tensor.device) == 0


def align_elements(dtype: torch.dtype) -> int:
    """Number of elements of ``dtype`` in one 64-byte unit (the CPU segment granule; per device:
    :func:`torch_bridge._cuda.segment_align_elements`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, ALIGN_BYTES // itemsize)


def to_jax(tensor: torch.Tensor, *, zero_copy: bool = False, complex_as_real: bool = False) -> jax.Array:
    """Import ``tensor`` (detached) as a JAX array. A complex tensor is imported as its real view
    (:func:`real_view`, shape ``(..., 2)``) when ``complex_as_real`` (the buffers of elementwise classes),
    and is a ``ValueError`` otherwise (a caller that does not expect the extra axis must not get it).

    With ``zero_copy=True`` the tensor must be dense and aligned, and the result is checked to alias the
    torch storage (``ValueError`` otherwise). Without it, non-dense tensors are first made contiguous (a
    copy), which is what the simple path wants.
    """
    check_dtype(tensor, "tensor", allow_complex=complex_as_real)
    t = real_view(tensor.detach())
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


def to_jax_copy(tensor: torch.Tensor, dtype=None, *, complex_as_real: bool = False) -> jax.Array:
    """A JAX-owned copy of ``tensor`` (safe to donate), optionally cast to the JAX ``dtype``."""
    arr = jnp.array(to_jax(tensor, complex_as_real=complex_as_real), copy=True)
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
