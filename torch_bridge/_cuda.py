"""What the bridge does differently on CUDA: JAX's memory policy, buffer alignment and stream ordering.

Everything device-specific of the bridge is here, so that the CPU path stays what it was (the buffers decide
once, at construction, whether they are on CUDA; a CPU buffer never calls into this module per step).

Execution model on CUDA (see also ``docs/gpu.md``)
-------------------------------------------------
torch and JAX queue their kernels on different CUDA streams: torch on its *current stream* (the legacy
default stream unless the user selects another), XLA on its own compute streams. Nothing orders work across
two streams except events, so every place where one library's kernels touch memory the other wrote or will
write needs an explicit edge:

1. *JAX reads after torch wrote* (the gradients of a backward, ``p.grad`` copied into the flat buffer,
   ``zero_grad``, a user's ``p.data.mul_``): DLPack's import handshake gives the edge. ``jax.dlpack.from_dlpack``
   passes a JAX stream to ``tensor.__dlpack__(stream=...)``; torch records an event on its current stream and
   makes that stream wait on it; PJRT records the imported buffer's definition event on that stream, and an
   executable waits on the definition events of all its inputs before its first kernel. A buffer imported
   *once* gives this edge once, at construction; so on CUDA the flat buffers are **re-imported at every
   step** (:func:`import_zero_copy`, one DLPack capsule per flat buffer, no host block). Because an
   execution waits for every input before it starts, one re-imported input orders the whole step, including
   its writes into the donated scratch buffer that torch's previous ``copy_`` read.
2. *torch uses what JAX wrote* (the new parameters, state read by ``optimizer.state``): ``torch.from_dlpack``
   passes torch's current stream to ``jax_array.__dlpack__(stream=...)`` and JAX makes that stream wait until
   the buffer is ready (JAX's documented ``stream`` argument of ``to_dlpack``). The new parameters are
   ready when the whole execution is done, so every later kernel on torch's current stream -- the
   write-back ``copy_``, the next forward, ``zero_grad``, the next backward writing the gradient buffer that
   JAX read -- runs after the step. ``step()`` then need not block the host, like ``torch.optim``: its
   results are ordered on the current stream at the time of ``step()``, which is torch.optim's own guarantee
   (work the user puts on another stream must wait on the current one, as with torch.optim).

Which order is used (``TORCH_BRIDGE_CUDA_ORDER``, read when a buffer is built)
--------------------------------------------------------------------------
The default is the *host-synchronous* order: ``torch.cuda.current_stream(dev).synchronize()`` before the step
and ``jax.block_until_ready`` on the step's outputs before torch sees them. It is correct whatever the stream
semantics of the installed JAX and PJRT plugin are, which is why it is the default while no GPU run has
confirmed the handshake (the project's spec, ``specs/bridge.md`` §7: host syncs on both sides first, optimise
with measurements). Its cost is a host stall per step: the GPU idles while the host dispatches the JAX step
and, after it, torch's next kernels (tens of microseconds each), and the host cannot run ahead of the GPU
across ``step()``.

``TORCH_BRIDGE_CUDA_ORDER=dlpack`` selects the handshake order above (edges 1 and 2 through DLPack, no host
block): the cheaper one, to become the default once ``scripts/gpu_check.sh`` shows its parity rows passing
and its benchmark rows faster. Edge 1 needs the JAX device to provide a stream for external ready events
(``Device.get_stream_for_external_ready_events``); some PJRT plugins do not (JAX then imports with
``stream=None``, which orders nothing), and ``dlpack`` then raises instead of ordering nothing.

Swap write-back (``write_back="swap"``) keeps the parameters in JAX-owned memory that torch writes through
views; there is no torch buffer whose import would order the init computation (which reads only that
memory), so swap buffers always use the host-synchronous order.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

# alignment of the data pointer of a buffer JAX imports without a copy: XLA:CPU's minimum (64 bytes); on CUDA
# cudaMalloc's guarantee (256 bytes), which XLA's own device buffers have and its kernels may assume (vector
# loads of up to 16 bytes need far less; 256 costs nothing: torch's caching allocator hands out 512-byte
# aligned blocks).
CPU_ALIGN_BYTES = 64
CUDA_ALIGN_BYTES = 256

PREALLOCATE_VARS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                    "XLA_PYTHON_CLIENT_ALLOCATOR")
ORDER_ENV = "TORCH_BRIDGE_CUDA_ORDER"

_warned_preallocation = False


# --------------------------------------------------------------------------------------------------
# memory: keep JAX from preallocating most of the GPU in a torch process
# --------------------------------------------------------------------------------------------------


def _initialised_platforms():
    """The platforms of JAX's initialised backends (empty if none is, or JAX is not imported yet).

    Reads JAX's private backend table without initialising it (``backends_are_initialized`` would be public
    enough, but does not say which platforms)."""
    if "jax" not in sys.modules:
        return set()
    from jax._src import xla_bridge  # noqa: PLC0415 (jax already imported: no cost)
    table = getattr(xla_bridge, "_backends", None)
    if table is None:  # a JAX without the table: ask the public predicate, platforms unknown
        return {"unknown"} if xla_bridge.backends_are_initialized() else set()
    return set(table)


def configure_jax_memory(environ=None) -> str:
    """Stop JAX from preallocating 75% of the GPU when the bridge is imported (torch owns that memory).

    Unless the user set one of ``XLA_PYTHON_CLIENT_PREALLOCATE`` / ``_MEM_FRACTION`` / ``_ALLOCATOR`` (their
    choice is kept), sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` -- JAX then allocates on demand with its
    BFC allocator and returns nothing to torch, but takes only what it uses. JAX reads the variable when its
    backends initialise (the first JAX computation or device query, not ``import jax``); if a GPU backend
    is already initialised, setting it would do nothing, so a ``UserWarning`` says so once instead.

    Returns what was done: ``"set"``, ``"user"`` (a variable was set by the user), ``"warned"`` (too late,
    warned), ``"late-cpu"`` (backends initialised, none of them a GPU: nothing to preallocate).
    """
    global _warned_preallocation
    env = os.environ if environ is None else environ
    if any(name in env for name in PREALLOCATE_VARS):
        return "user"
    platforms = _initialised_platforms()
    if not platforms:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        return "set"
    if platforms <= {"cpu"}:
        return "late-cpu"
    if not _warned_preallocation:
        _warned_preallocation = True
        warnings.warn(
            "torch_bridge: JAX's GPU backend was initialised before torch_bridge was imported, with JAX's "
            "default of preallocating 75% of the GPU memory, which torch then cannot use. Set "
            "XLA_PYTHON_CLIENT_PREALLOCATE=false (or XLA_PYTHON_CLIENT_MEM_FRACTION) in the environment before "
            "the first JAX computation, or import torch_bridge first.", UserWarning, stacklevel=3)
    return "warned"


# --------------------------------------------------------------------------------------------------
# allocation and import
# --------------------------------------------------------------------------------------------------


def align_bytes(device: torch.device) -> int:
    """The data-pointer alignment the bridge requires for a zero-copy import on ``device``."""
    return CUDA_ALIGN_BYTES if device.type == "cuda" else CPU_ALIGN_BYTES


def segment_align_elements(dtype: torch.dtype, device: torch.device) -> int:
    """Elements of ``dtype`` per segment granule of a flat buffer on ``device``: :func:`align_bytes` (64 bytes on
    the CPU, 256 on CUDA, ``specs/bridge.md`` §7), so that every ``p.data`` / ``p.grad`` view starts where a
    tensor allocated by itself would (cudaMalloc alignment on CUDA: vectorised kernels and cuBLAS see the
    same alignment as without the bridge). At most ``align - itemsize`` bytes of padding per parameter."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, align_bytes(device) // itemsize)


def aligned_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled 1-d tensor on ``device`` whose data pointer is :func:`align_bytes`-aligned.

    torch's allocators already align that much (CPU: 64 bytes; the CUDA caching allocator: 512-byte blocks),
    so this is one ``torch.zeros``; with another allocator (a pluggable CUDA allocator, an unusual CPU
    build) it over-allocates by one alignment unit and returns the aligned slice instead of letting the
    import fail."""
    out = torch.zeros(numel, dtype=dtype, device=device)
    align = align_bytes(out.device)
    if out.data_ptr() % align == 0:
        return out
    itemsize = out.element_size()
    if align % itemsize:
        raise ValueError(f"cannot align {dtype} elements to {align} bytes")
    pad = align // itemsize
    raw = torch.zeros(numel + pad, dtype=dtype, device=device)
    skip = (-raw.data_ptr() % align) // itemsize
    out = raw[skip:skip + numel]
    if out.data_ptr() % align:
        raise ValueError(f"could not allocate a {align}-byte aligned buffer on {device}")
    return out


def import_zero_copy(tensor: torch.Tensor):
    """``dlpack.to_jax(tensor, zero_copy=True)`` with ``tensor``'s CUDA device current (torch's ``__dlpack__``
    refuses a tensor of another device than the current one, and the handshake uses that device's current
    stream)."""
    from . import dlpack  # noqa: PLC0415 (dlpack imports jax; this module must not at import)
    with torch.cuda.device(tensor.device):
        return dlpack.to_jax(tensor, zero_copy=True)


# --------------------------------------------------------------------------------------------------
# stream order
# --------------------------------------------------------------------------------------------------

_HANDSHAKE = {}  # jax device id -> whether it provides a stream for external ready events


def _device_has_handshake(jax_device) -> bool:
    key = (jax_device.platform, jax_device.id)
    if key not in _HANDSHAKE:
        try:
            stream = jax_device.get_stream_for_external_ready_events()
            _HANDSHAKE[key] = bool(stream)
        except Exception:  # UNIMPLEMENTED in some plugins, or a device type without streams
            _HANDSHAKE[key] = False
    return _HANDSHAKE[key]


def order_mode(jax_device, *, swap: bool = False) -> str:
    """``"sync"`` (host-synchronous, the default) or ``"dlpack"`` (re-import handshake, no host block) for a
    CUDA buffer: ``TORCH_BRIDGE_CUDA_ORDER=dlpack`` selects the handshake, which raises ``ValueError`` where
    the JAX device offers no stream for it (it would order nothing); swap buffers are always ``"sync"``."""
    chosen = os.environ.get(ORDER_ENV, "") or "sync"
    if chosen not in ("sync", "dlpack"):
        raise ValueError(f"{ORDER_ENV}={chosen!r}: expected 'sync' or 'dlpack' (or unset: 'sync')")
    if swap or chosen == "sync":
        return "sync"
    if not _device_has_handshake(jax_device):
        raise ValueError(f"{ORDER_ENV}=dlpack: the JAX device {jax_device} provides no stream for external ready "
                         "events, so a DLPack import would not wait for torch's stream; unset it (host-synchronous "
                         "order)")
    return "dlpack"


_TORCH_DEVICE_ORDER = {}  # (torch device, TORCH_BRIDGE_CUDA_ORDER) -> order mode


def order_for(tensor: torch.Tensor):
    """``None`` for a CPU tensor (one attribute test); for a CUDA tensor the :func:`order_mode` of its device,
    looked up once per device. For the per-step importers (simple leaves, EnhancedSGD) that keep no buffer
    object to decide in."""
    if tensor.device.type != "cuda":
        return None
    key = (tensor.device, os.environ.get(ORDER_ENV, ""))
    if key not in _TORCH_DEVICE_ORDER:
        from . import dlpack  # noqa: PLC0415
        with torch.cuda.device(tensor.device):
            jax_device = next(iter(dlpack.to_jax(tensor.detach()).devices()))
        _TORCH_DEVICE_ORDER[key] = order_mode(jax_device)
    return _TORCH_DEVICE_ORDER[key]


def wait_for_torch(device: torch.device) -> None:
    """Host-synchronous edge 1: block until every kernel queued on torch's current stream of ``device`` ran."""
    torch.cuda.current_stream(device).synchronize()


def wait_for_jax(arrays) -> None:
    """Host-synchronous edge 2: block until the JAX ``arrays`` (and so the execution that made them) are done."""
    import jax  # noqa: PLC0415
    jax.block_until_ready(arrays)
