"""torch_bridge.AutoSGM (and JaxOptimizer on the registry's AutoSGM entries) take the flat path.

The flat path packs a group's tensors into one buffer and steps it with ``segments=FlatLayout``: one
DLPack import and one compiled program per group, whatever the number of tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_bridge
from jaxopt_suite import registry
from torch_bridge import AutoSGM


def _params(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (17,), (), (4, 3), (2, 2, 2), (9,)][:n]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 0.1
    return ps


def _flat_buffers(opt):
    return [buf for rt in opt._runtime for buf in rt.buffers]


@pytest.mark.parametrize("lr_cfg", [pytest.param((True, 1e-2, 0), marks=pytest.mark.slow), (True, 1e-2, 1),
                                    pytest.param((True, 1e-2, 4), marks=pytest.mark.slow),
                                    pytest.param((False, 1e-2, 0), marks=pytest.mark.slow)])
def test_autosgm_bridge_uses_one_flat_buffer_and_matches_simple_path(lr_cfg):
    """Flat and simple (flat=False, per tensor) paths: same parameters after 3 steps (one tensor without a
    gradient at the second step), float64: the same per-tensor rule, the sums in the same fixed order; the
    remaining difference is fusion-dependent rounding of per-tensor scalars (bound: 64 eps relative)."""
    torch.manual_seed(0)
    import jax

    with jax.enable_x64(True):
        p_flat = [p.detach().double().requires_grad_() for p in _params()]
        p_simple = [p.detach().clone().requires_grad_() for p in p_flat]
        flat = AutoSGM(p_flat, lr_cfg=lr_cfg, beta_cfg=(0.9999, 0.999, 0.9, 0.5, 0, True), wd_cfg=(1e-3, 0))
        simple = AutoSGM(p_simple, lr_cfg=lr_cfg, beta_cfg=(0.9999, 0.999, 0.9, 0.5, 0, True), wd_cfg=(1e-3, 0),
                         flat=False)
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1 for p in p_flat]
            for i, (a, b) in enumerate(zip(p_flat, p_simple)):
                skip = step == 1 and i == 1
                a.grad = None if skip else grads[i].clone()
                b.grad = None if skip else grads[i].clone()
            flat.step()
            simple.step()
        bufs = _flat_buffers(flat)
        assert len(bufs) == 1 and bufs[0].flat, "AutoSGM did not take the flat path"
        assert bufs[0].mode == "segment"
        assert not _flat_buffers(simple)[0].flat
        eps = float(np.finfo(np.float64).eps)
        for a, b in zip(p_flat, p_simple):
            d = (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0
            assert d <= 64 * eps * max(1.0, b.detach().abs().max().item() if b.numel() else 1.0)
        assert int(flat.state[p_flat[1]]["step"]) == 2 and int(flat.state[p_flat[0]]["step"]) == 3


@pytest.mark.parametrize("name", [pytest.param(e.name, marks=() if e.name == "autosgm_adam" else pytest.mark.slow)
                                  for e in registry.entries() if e.family == "autosgm"])
def test_generic_bridge_on_autosgm_entries_is_flat(name):
    params = _params()
    opt = torch_bridge.JaxOptimizer(params, name)
    before = [p.detach().clone() for p in params]
    opt.step()
    bufs = _flat_buffers(opt)
    assert len(bufs) == 1 and bufs[0].flat, f"{name}: not on the flat path"
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before)), f"{name}: the step did nothing"
