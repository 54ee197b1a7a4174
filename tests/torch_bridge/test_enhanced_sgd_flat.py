"""torch_bridge.EnhancedSGD's flat path: taken by default, bit-identical to the per-parameter path."""

from __future__ import annotations

import numpy as np
import torch

from torch_bridge import EnhancedSGD


def test_bridge_takes_the_flat_path_with_the_same_results():
    """torch_bridge.EnhancedSGD: the flat path (default) and ``flat=False`` give bit-identical parameters and
    state dicts over steps with a closure loss, a parameter without gradient and a state_dict round trip."""
    def run(flat):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = EnhancedSGD(model.parameters(), lr=0.05, lookahead_k=2, seed=3, flat=flat)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g)
        for i in range(5):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            if i == 2:  # the last bias gets no gradient at this step
                closure()
                model[2].bias.grad = None
                opt.step(value=torch.tensor(0.5))
            else:
                opt.step(closure)
            if i == 3:  # resume through the torch-side state
                opt.load_state_dict(opt.state_dict())
        return opt, [p.detach().clone() for p in model.parameters()]

    flat_opt, flat_params = run(True)
    list_opt, list_params = run(False)
    assert flat_opt._jlayout is not None and flat_opt._jlayout.num_tensors == 4  # the flat path ran
    assert list_opt._jlayout is None
    for a, b in zip(flat_params, list_params):
        assert torch.equal(a, b)
    sa, sb = flat_opt.state_dict(), list_opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys()

    def same(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                same(a[k], b[k], (*where, k))
        else:
            assert np.array_equal(torch.as_tensor(a).numpy(), torch.as_tensor(b).numpy(), equal_nan=True), where

    for key in sa["state"]:
        same(sa["state"][key], sb["state"][key], (key,))
