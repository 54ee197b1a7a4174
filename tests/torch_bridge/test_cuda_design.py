"""The CUDA design of the bridge, checked where it can be on a CPU-only machine (issue 11 item 6).

* JAX's GPU preallocation is switched off when ``torch_bridge`` is imported, unless the user chose a policy,
  and a warning says so when JAX's GPU backend was initialised first (fresh interpreters: the decision
  depends on process state at import).
* CPU buffers never take a CUDA branch (``_cuda_order is None``) and their flat buffers are 64-byte aligned;
  the aligned allocator realigns a misaligned allocation instead of letting the import copy.
* ``TORCH_BRIDGE_CUDA_ORDER`` is validated.
* ``scripts/gpu_check.sh`` exits with status 2 and a message that names the reason on a machine without CUDA.

The CUDA paths themselves (stream order, 256-byte alignment on the device) run only in ``scripts/gpu_check.sh``.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import torch_bridge as tb
from torch_bridge import _cuda

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARS = _cuda.PREALLOCATE_VARS


def _fresh(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env.update(env_changes)
    env["PYTHONPATH"] = ROOT
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


CODE = ("import os, torch_bridge, jax; from jax._src import xla_bridge as xb; "
        "print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), xb.backends_are_initialized())")


def test_import_sets_preallocate_false_unless_the_user_chose():
    """A fresh interpreter (the decision depends on what JAX did before the import); the user's choices are
    checked on a dict (a fresh interpreter per case costs ~3 s; one of them runs in the slow test below)."""
    out = _fresh(CODE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["false", "False"]  # set, and importing the bridge initialised no backend
    for name in VARS:  # each of the three variables counts as the user's choice: nothing added
        env = {name: "x"}
        assert _cuda.configure_jax_memory(env) == "user" and env == {name: "x"}


@pytest.mark.slow
def test_user_choice_is_kept_in_a_fresh_process():
    out = _fresh(CODE, XLA_PYTHON_CLIENT_MEM_FRACTION=".5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]


def test_backend_initialised_first_cpu_only_and_gpu(monkeypatch):
    # in this process JAX's CPU backend is initialised (the bridge tests ran JAX): nothing to preallocate
    import jax
    jax.devices()
    env = {}
    assert _cuda.configure_jax_memory(env) == "late-cpu" and env == {}
    # a GPU backend initialised before the bridge: too late to set the variable, so it warns, once
    from jax._src import xla_bridge
    monkeypatch.setattr(xla_bridge, "_backends", {"cpu": None, "cuda": None})
    monkeypatch.setattr(_cuda, "_warned_preallocation", False)
    with pytest.warns(UserWarning, match="XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        assert _cuda.configure_jax_memory(env) == "warned"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cuda.configure_jax_memory(env) == "warned"  # no second warning
    assert env == {}


def test_cpu_buffers_take_no_cuda_branch_and_are_aligned():
    ps = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    for kw in ({}, {"write_back": "swap"}):
        buf = tb.Adam(ps, lr=0.1, **kw)._runtime[0].buffers[0]
        assert buf.flat and buf._cuda_order is None
        assert buf.flat_g.data_ptr() % _cuda.CPU_ALIGN_BYTES == 0
        # segments padded to 64 bytes on the CPU (CUDA: 256), as before the CUDA work
        assert buf.layout.offsets == (0, 16) and buf.layout.total == 32
    assert _cuda.segment_align_elements(torch.float32, torch.device("cuda")) == 64
    assert _cuda.segment_align_elements(torch.bfloat16, torch.device("cpu")) == 32
    simple = tb.Adam(ps, lr=0.1, flat=False)
    for p in ps:
        p.grad = torch.ones_like(p)
    simple.step()
    assert simple._runtime[0].buffers[0]._cuda_order is None


def test_aligned_zeros_realigns_a_misaligned_allocation(monkeypatch):
    real = torch.zeros
    calls = []

    def misaligned(n, dtype=None, device=None):
        calls.append(n)
        base = real(n + 16, dtype=dtype, device=device)
        k = next(k for k in range(1, 17) if (base.data_ptr() + k * base.element_size()) % 64)
        return base[k:k + n]  # an allocator that hands out a pointer off the 64-byte grid

    monkeypatch.setattr(torch, "zeros", misaligned)
    out = _cuda.aligned_zeros(100, torch.float32, torch.device("cpu"))
    assert out.data_ptr() % 64 == 0 and out.shape == (100,) and not out.any()
    assert len(calls) == 2  # the first allocation was misaligned, the second over-allocated and sliced


class _FakeDevice:
    """A JAX device as order_mode sees it: with or without a stream for external ready events."""

    platform, id = "fake", 0

    def __init__(self, stream):
        self.stream = stream
        self.id = stream  # one handshake cache entry per fake

    def get_stream_for_external_ready_events(self):
        if self.stream is None:
            raise RuntimeError("UNIMPLEMENTED: no external ready events stream")
        return self.stream


def test_order_mode_default_sync_dlpack_on_request_and_validated(monkeypatch):
    monkeypatch.delenv(_cuda.ORDER_ENV, raising=False)
    assert _cuda.order_mode(_FakeDevice(1234)) == "sync"  # host-synchronous until a GPU run confirms the handshake
    monkeypatch.setenv(_cuda.ORDER_ENV, "dlpack")
    assert _cuda.order_mode(_FakeDevice(1234)) == "dlpack"
    assert _cuda.order_mode(_FakeDevice(1234), swap=True) == "sync"  # swap: no torch buffer to import
    with pytest.raises(ValueError, match="provides no stream for external ready events"):
        _cuda.order_mode(_FakeDevice(None))  # the handshake would order nothing: never silently
    monkeypatch.setenv(_cuda.ORDER_ENV, "fast")
    with pytest.raises(ValueError, match="TORCH_BRIDGE_CUDA_ORDER='fast'"):
        _cuda.order_mode(_FakeDevice(1234))


def test_gpu_check_without_cuda_exits_2_with_the_reason():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: scripts/gpu_check.sh would run the full check")
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "no CUDA here, nothing was run" in out.stderr and "torch.cuda.is_available() is False" in out.stderr
    assert out.stdout == ""
