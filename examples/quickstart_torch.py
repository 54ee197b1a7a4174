"""Quickstart for PyTorch users with only torch and the core dependencies (no data sets, no Flax).

A small ``torch.nn`` regression model trained with ``torch_bridge.AdamW`` (the optimizer runs in JAX on
buffers shared with torch through DLPack) beside ``torch.optim.AdamW`` from the same initial weights and
batches, with a torch LR scheduler on both; the two loss curves agree to float32 rounding. The optimizer's
``state_dict`` is torch's format and loads back into a fresh bridge optimizer.

Run: ``python examples/quickstart_torch.py [--steps 100]`` (it works from an installed wheel). Exits
non-zero if the bridge run does not train or differs from torch.optim beyond float32 rounding.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import torch_bridge


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def make_data(seed: int = 1, n: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x[:, :1]) + 0.1 * x[:, 1:2] ** 2
    return x, y


def train(model, opt, sched, x, y, steps: int, batch: int = 64) -> list[float]:
    losses = []
    for step in range(steps):
        start = (step * batch) % (len(x) - batch)
        xb, yb = x[start:start + batch], y[start:start + batch]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    x, y = make_data()
    runs = {}
    for name, cls in (("torch_bridge.AdamW", torch_bridge.AdamW), ("torch.optim.AdamW", torch.optim.AdamW)):
        model = make_model()
        opt = cls(model.parameters(), lr=1e-2, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
        runs[name] = (train(model, opt, sched, x, y, args.steps), model, opt)
    bridge_losses, model, opt = runs["torch_bridge.AdamW"]
    torch_losses = runs["torch.optim.AdamW"][0]
    gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(bridge_losses, torch_losses))
    print(f"loss {bridge_losses[0]:.4f} -> {bridge_losses[-1]:.5f} (bridge), "
          f"{torch_losses[0]:.4f} -> {torch_losses[-1]:.5f} (torch.optim); max relative gap {gap:.2e}")

    # the state dict is torch's format: a fresh bridge optimizer resumes from it
    resumed = torch_bridge.AdamW(copy.deepcopy(model).parameters(), lr=1e-2, weight_decay=1e-2)
    resumed.load_state_dict(opt.state_dict())
    step_keys = sorted(next(iter(opt.state_dict()["state"].values())))
    print(f"state_dict per-parameter keys: {step_keys}")
    return {"bridge": bridge_losses, "torch": torch_losses, "max_relative_gap": gap, "state_keys": step_keys}


if __name__ == "__main__":
    out = main()
    # float32 arithmetic in two implementations over ~100 steps: agreement to ~1e-4 relative on the loss
    if not (out["bridge"][-1] < out["bridge"][0] / 3 and out["max_relative_gap"] < 1e-3):
        print("the bridge run did not train, or differs from torch.optim", file=sys.stderr)
        sys.exit(1)
