"""Train in PyTorch, resume in Flax NNX: the optimizer state crosses frameworks and the run continues exactly.

    python -m examples.cross_backend_resume --steps 100

1. A digits MLP (64-32-10, tanh) trains ``--steps`` steps in PyTorch with ``torch_bridge.AdamW``; model and
   optimizer are saved with ``torch.save``.
2. The file is loaded; ``torch_bridge.checkpoint.flax_params`` and ``to_optax`` turn the weights and the
   optimizer state (moments, per-parameter step counts) into the Flax NNX model's parameter pytree and the
   state of ``jaxopt_suite.adamw`` over it. The default mapping pairs torch module order with Flax paths and
   transposes ``Linear`` weights, ``(out, in)`` -> ``(in, out)``, moments included.
3. The JAX side is saved with orbax-checkpoint and restored (as a JAX training job would checkpoint),
   then trains ``--steps`` more steps.

The loss curve of both halves is printed beside an uninterrupted ``2 × --steps`` run in Flax from the same
initial weights, and beside a resume that drops the optimizer state (a fresh ``adamw`` at the switch), which
shows what the conversion preserves. One plot goes to ``--out-dir`` (``results/`` by default).

The two frameworks compute the same float32 gradients with different roundings, so the curves agree to the
float32 level (about 1e-6 on the loss), not bit for bit; the optimizer arithmetic itself is the same
transformation on both sides.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import jaxopt_suite
import torch_bridge
from examples._digits import batch_indices, digits_split
from torch_bridge import checkpoint

HIDDEN = 32
LR, WEIGHT_DECAY = 3e-3, 1e-2
BATCH = 64


class FlaxMLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(64, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, 10, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


def torch_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10))


def torch_phase(model, opt, x, y, idx) -> list[float]:
    losses = []
    for rows in idx:
        xb, yb = torch.from_numpy(x[rows]), torch.from_numpy(y[rows]).long()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@functools.lru_cache(maxsize=None)
def _train_step(graphdef, tx):
    """One jitted step per (model structure, transformation): the three Flax runs share its compile."""

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def jax_phase(graphdef, params, tx, opt_state, x, y, idx):
    step = _train_step(graphdef, tx)
    losses = []
    for rows in idx:
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x[rows]), jnp.asarray(y[rows]))
        losses.append(float(loss))
    return params, opt_state, losses


def orbax_round_trip(directory: str, params, opt_state):
    """Save the JAX training state with orbax-checkpoint and restore it into the same structure."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(directory), "jax_state")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"params": params, "opt_state": opt_state})
        ckptr.wait_until_finished()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = ckptr.restore(path, target)
    return restored["params"], restored["opt_state"]


def run(steps: int, work_dir: str) -> dict:
    x, y, _, _ = digits_split()
    idx = batch_indices(len(x), 2 * steps, BATCH)

    # ---- phase 1: PyTorch, torch_bridge.AdamW; save with torch.save -------------------------------
    model = torch_mlp()
    flax_model = FlaxMLP(rngs=nnx.Rngs(0))
    like = nnx.state(flax_model, nnx.Param)
    init_params = checkpoint.flax_params(model, like)  # the same initial weights on both sides
    opt = torch_bridge.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    torch_losses = torch_phase(model, opt, x, y, idx[:steps])
    torch_file = os.path.join(work_dir, "torch_checkpoint.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, torch_file)

    # ---- convert: torch file -> Flax params + optax state --------------------------------------------
    saved = torch.load(torch_file, weights_only=True)
    restored_model = torch_mlp(seed=1)  # other weights: everything comes from the file
    restored_model.load_state_dict(saved["model"])
    params = checkpoint.flax_params(restored_model, like)
    tx, opt_state = checkpoint.to_optax(
        saved["optimizer"], params, torch_bridge.AdamW,
        torch_names=[n for n, _ in restored_model.named_parameters()],
        tx=jaxopt_suite.adamw(LR, weight_decay=WEIGHT_DECAY),
        hyperparams={"learning_rate": LR, "weight_decay": WEIGHT_DECAY})
    params, opt_state = orbax_round_trip(work_dir, params, opt_state)

    # ---- phase 2: Flax NNX, jaxopt_suite.adamw ---------------------------------------------------------
    graphdef, _ = nnx.split(flax_model, nnx.Param)
    _, _, jax_losses = jax_phase(graphdef, params, tx, opt_state, x, y, idx[steps:])

    # ---- references: uninterrupted Flax run; resume without the optimizer state ----------------------
    _, _, full = jax_phase(graphdef, init_params, tx, tx.init(init_params), x, y, idx)
    _, _, fresh = jax_phase(graphdef, params, tx, tx.init(params), x, y, idx[steps:])

    resumed = np.array(torch_losses + jax_losses)
    full = np.array(full)
    return {
        "steps": steps,
        "resumed": resumed,
        "uninterrupted": full,
        "fresh_state": np.array(fresh),
        "max_diff_first_half": float(np.max(np.abs(resumed[:steps] - full[:steps]))),
        "max_diff_second_half": float(np.max(np.abs(resumed[steps:] - full[steps:]))),
        "max_diff_fresh_state": float(np.max(np.abs(np.array(fresh) - full[steps:]))),
    }


def plot(metrics: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = metrics["steps"]
    t = np.arange(1, 2 * steps + 1)
    fig, (ax, dx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(t, metrics["uninterrupted"], color="0.6", lw=3, label="Flax, uninterrupted")
    ax.plot(t[:steps], metrics["resumed"][:steps], color="C0", lw=1, label="PyTorch (torch_bridge.AdamW)")
    ax.plot(t[steps:], metrics["resumed"][steps:], color="C1", lw=1, label="Flax, resumed from the torch file")
    ax.plot(t[steps:], metrics["fresh_state"], color="C3", lw=1, ls="--", label="Flax, resumed without optimizer state")
    ax.axvline(steps + 0.5, color="k", lw=0.5)
    ax.set_ylabel("training loss")
    ax.legend()
    ax.set_title("digits MLP: 2 x %d AdamW steps, PyTorch then Flax NNX" % steps)
    dx.semilogy(t, np.abs(metrics["resumed"] - metrics["uninterrupted"]) + 1e-12, color="C1",
                label="|resumed - uninterrupted|")
    dx.semilogy(t[steps:], np.abs(metrics["fresh_state"] - metrics["uninterrupted"][steps:]) + 1e-12, color="C3",
                ls="--", label="|no state - uninterrupted|")
    dx.set_xlabel("step")
    dx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="steps in each framework (default 100)")
    ap.add_argument("--out-dir", default="results", help="where the plot goes (default results/)")
    ap.add_argument("--every", type=int, default=10, help="print every n-th step")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as work_dir:
        metrics = run(args.steps, work_dir)
    s = args.steps
    print(f"{'step':>5} {'phase':<6} {'resumed':>10} {'uninterrupted':>14} {'|diff|':>9} {'no-state':>10}")
    for k in sorted(set(range(0, 2 * s, args.every)) | {s - 1, s, 2 * s - 1}):
        phase = "torch" if k < s else "flax"
        fresh = f"{metrics['fresh_state'][k - s]:10.6f}" if k >= s else f"{'':>10}"
        print(f"{k + 1:>5} {phase:<6} {metrics['resumed'][k]:10.6f} {metrics['uninterrupted'][k]:14.6f} "
              f"{abs(metrics['resumed'][k] - metrics['uninterrupted'][k]):9.2e} {fresh}")
    print(f"max |resumed - uninterrupted|: first half (PyTorch) {metrics['max_diff_first_half']:.2e}, "
          f"second half (Flax, resumed) {metrics['max_diff_second_half']:.2e}")
    print(f"max |resumed without optimizer state - uninterrupted|: {metrics['max_diff_fresh_state']:.2e}")
    path = os.path.join(args.out_dir, "cross_backend_resume.png")
    plot(metrics, path)
    print(f"plot: {path}")
    metrics["plot"] = path
    return metrics


if __name__ == "__main__":
    main()
