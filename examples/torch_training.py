"""A PyTorch training loop whose optimizer runs in JAX through ``torch_bridge``.

An MLP on scikit-learn's digits, trained with ``torch_bridge.AdamW`` and a torch LR scheduler
(OneCycleLR, which also cycles Adam's β1, or cosine annealing), optionally with ``GradScaler`` loss
scaling. Halfway through, the model, optimizer and scheduler are saved with their ``state_dict``s, loaded
into fresh objects, and training resumes; the resumed run is checked against the uninterrupted one.
With ``--asgd`` it also trains ``torch_bridge.ASGD`` and evaluates on the averaged weights.

Run: ``python -m examples.torch_training --steps 200 [--schedule cosine] [--grad-scaler] [--asgd]``.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch

import torch_bridge


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order] / 16.0, y[order]
    split = int(0.8 * len(x))
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return (as_t(x[:split], torch.float32), as_t(y[:split], torch.long),
            as_t(x[split:], torch.float32), as_t(y[split:], torch.long))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def make_training(args, seed: int = 0):
    model = make_model(seed)
    # weight decay on matrices only: two param groups with their own hyperparameters
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch_bridge.AdamW([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr)
    if args.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, cycle_momentum=True)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if args.grad_scaler else None
    return model, opt, sched, scaler


def batches(x, y, batch_size: int, step: int):
    start = (step * batch_size) % (len(x) - batch_size)
    return x[start:start + batch_size], y[start:start + batch_size]


def train_steps(model, opt, sched, scaler, data, first: int, last: int, batch_size: int):
    x, y = data[0], data[1]
    losses = []
    for step in range(first, last):
        xb, yb = batches(x, y, batch_size, step)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def checkpoint_resume(args, data):
    """Train half, save (model, optimizer, scheduler), load into fresh objects, train the rest."""
    half = args.steps // 2
    model, opt, sched, scaler = make_training(args)
    train_steps(model, opt, sched, scaler, data, 0, half, args.batch_size)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model, opt, sched, scaler = make_training(args, seed=1)  # different init: everything comes from ckpt
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    if scaler is not None:
        scaler.load_state_dict(ckpt["scaler"])
    train_steps(model, opt, sched, scaler, data, half, args.steps, args.batch_size)
    return model


def train_asgd(args, data):
    model = make_model()
    opt = torch_bridge.ASGD(model.parameters(), lr=0.05, t0=args.steps // 2, lambd=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_steps(model, opt, sched, None, data, 0, args.steps, args.batch_size)
    last = accuracy(model, data[2], data[3])
    with opt.averaged():
        averaged = accuracy(model, data[2], data[3])
    return last, averaged


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle")
    ap.add_argument("--grad-scaler", action="store_true", help="scale the loss with torch.amp.GradScaler")
    ap.add_argument("--asgd", action="store_true", help="also train ASGD and evaluate the averaged weights")
    args = ap.parse_args(argv)
    data = load_data()
    model, opt, sched, scaler = make_training(args)
    initial = float(torch.nn.functional.cross_entropy(model(data[0]), data[1]).detach())
    losses = train_steps(model, opt, sched, scaler, data, 0, args.steps, args.batch_size)
    final = float(torch.nn.functional.cross_entropy(model(data[0]), data[1]).detach())
    resumed = checkpoint_resume(args, data)
    gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), resumed.parameters()))
    metrics = {
        "initial_train_loss": initial,
        "final_train_loss": final,
        "test_accuracy": accuracy(model, data[2], data[3]),
        "resume_max_abs_diff": gap,
        "compiled_steps": torch_bridge.compiled_step_cache_size(),
    }
    print(f"AdamW through torch_bridge, {args.schedule}, {args.steps} steps"
          f"{' with GradScaler' if scaler else ''}: train loss {initial:.3f} -> {final:.3f}, "
          f"test accuracy {metrics['test_accuracy']:.3f}; last batch loss {losses[-1]:.3f}")
    print(f"checkpoint at step {args.steps // 2} and resume: max |Δθ| vs uninterrupted run = {gap:.1e}")
    if args.asgd:
        last, averaged = train_asgd(args, data)
        metrics.update(asgd_test_accuracy=last, asgd_averaged_test_accuracy=averaged)
        print(f"ASGD: test accuracy {last:.3f} on the last weights, {averaged:.3f} on the averaged weights")
    return metrics


if __name__ == "__main__":
    main()
