"""CUDA check of the torch bridge: parity, torch semantics and the Adam benchmark, printed as one table.

Run on a machine with CUDA builds of torch and JAX already installed (nothing is installed, nothing is
downloaded), from the repository root: ``bash scripts/gpu_check.sh`` (or ``PYTHONPATH=. python
scripts/gpu_check.py``). It has never been run by the project (no GPU was available when it was written):
its results are what tells whether the CUDA design in ``torch_bridge/_cuda.py`` holds.

Parts (each in its own process, with its own timeout; all of them fit in 8 minutes):

* ``parity`` (140 s): every bridge class against ``torch.optim`` on CUDA, float32, 6 steps of a small MLP.
  Classes with a torch counterpart (SGD, Adam, AdamW, ASGD, the generic JaxOptimizer("adam"), Lookahead
  against TorchLookahead(torch.optim.Adam), ADOPT against the ``adopt`` package when installed) are
  compared with it; AutoSGM, ELRA, EnhancedSGD (and ADOPT without ``adopt``) with the same bridge class on
  the CPU. Adam and SGD also run on the simple path and with ``write_back="swap"``, and every row runs in
  both stream orders (``TORCH_BRIDGE_CUDA_ORDER=dlpack`` and ``sync``). The gradients of each step are made
  by a long chain of torch kernels ending right before ``step()`` and the parameters are read right after
  it, so a missing stream edge shows as a parity failure instead of passing by luck.
* ``semantics`` (200 s): ``tests/torch_bridge/test_torch_semantics.py`` with ``TORCH_BRIDGE_TEST_DEVICE=cuda``
  (``-m "not slow"``).
* ``bench`` (110 s): Adam step time, bridge (copy write-back in both stream orders, swap) vs
  ``torch.optim.Adam(fused=True)`` and ``foreach=True``, on ~100M params in 200 tensors and ~10M params in 1000 tensors: interleaved rounds,
  median of per-step times measured with ``torch.cuda.synchronize()`` around each step.

Exit status: 0 when every part ran and passed, 1 when something failed or timed out, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART_TIMEOUTS = {"parity": 140, "semantics": 200, "bench": 110}  # seconds: 450 s, inside the 480 s (8 min) of gpu_check.sh
NO_CUDA = 2
# internal, to smoke-test this script's code on a machine without a GPU: GPU_CHECK_DEVICE=cpu runs the parts on
# the CPU (parity then compares the CPU with itself) and GPU_CHECK_SCALE=0.01 shrinks the benchmark; the
# real check never sets them
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SCALE = float(os.environ.get("GPU_CHECK_SCALE", "1"))


def _sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_problem() -> str | None:
    """Why this machine cannot run the check (None when it can): torch must see a CUDA device and JAX must
    have a GPU backend (both CUDA builds, the same GPU)."""
    import torch
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False); this check "
                "needs a CUDA build of torch and a GPU")
    import torch_bridge  # noqa: F401  (before JAX's backend starts: keeps JAX from preallocating the GPU)
    import jax
    try:
        gpus = jax.devices("gpu")
    except RuntimeError as exc:
        return (f"JAX {jax.__version__} has no GPU backend ({exc}); install a CUDA build of JAX "
                "(jax[cuda12]) next to torch's CUDA")
    if not gpus:
        return f"JAX {jax.__version__} lists no GPU device"
    return None


# ---------------------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------------------


def _mlp(seed, device):
    import torch
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
                            torch.nn.Linear(128, 10))
    return m.to(device)


def _grads(m, x, device):
    """Forward and backward; on CUDA the gradients are then zeroed and written back only after a long chain
    of kernels queued on torch's current stream (~1-2 ms), the last kernels before ``step()``: a JAX step
    that read the gradient buffer without waiting for torch's stream would see zeros (Adam-type updates
    are invariant to the gradient's scale, so zeros are what makes a race visible). Returns the loss as a
    0-d tensor (no host sync)."""
    import torch
    loss = (m(x) ** 2).mean() + 1.0
    loss.backward()
    if device.type == "cuda":
        with torch.no_grad():
            saved = [p.grad.clone() for p in m.parameters()]
            for p in m.parameters():
                p.grad.zero_()
            big = torch.randn(2048, 2048, device=device, generator=torch.Generator(device).manual_seed(0))
            big /= 2048 ** 0.5
            acc = big
            for _ in range(12):
                acc = torch.tanh(acc @ big)
            zero = acc.sum() * 0.0  # exactly 0 (tanh is bounded), available only once the chain ran
            for p, g in zip(m.parameters(), saved):
                p.grad.copy_(g + zero)
    return loss.detach()


def _factories():
    import torch
    import torch_bridge as tb
    try:
        from adopt import ADOPT as RefADOPT  # the torch-adopt reference package, when installed
    except Exception:  # noqa: BLE001
        RefADOPT = None
    ref = {
        "SGD": (lambda ps: tb.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
                lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False)),
        "SGD flat=False": (lambda ps: tb.SGD(ps, lr=0.05, momentum=0.9, flat=False),
                           lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=False)),
        "Adam": (lambda ps: tb.Adam(ps, lr=1e-3, weight_decay=1e-3),
                 lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-3, foreach=False)),
        "Adam flat=False": (lambda ps: tb.Adam(ps, lr=1e-3, flat=False),
                            lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False)),
        "Adam swap": (lambda ps: tb.Adam(ps, lr=1e-3, write_back="swap"),
                      lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False)),
        "AdamW": (lambda ps: tb.AdamW(ps, lr=1e-3, weight_decay=0.05),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05, foreach=False)),
        "ASGD": (lambda ps: tb.ASGD(ps, lr=0.01, t0=2),
                 lambda ps: torch.optim.ASGD(ps, lr=0.01, t0=2, foreach=False)),
        "JaxOptimizer(adam)": (lambda ps: tb.JaxOptimizer(ps, "adam", lr=1e-3),
                               lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False)),
        "Lookahead(Adam)": (lambda ps: tb.Lookahead(tb.Adam(ps, lr=1e-3), k=2, alpha=0.5),
                            lambda ps: tb.TorchLookahead(torch.optim.Adam(ps, lr=1e-3, foreach=False), k=2, alpha=0.5)),
        "ADOPT": (lambda ps: tb.ADOPT(ps, lr=1e-3),
                  (lambda ps: RefADOPT(ps, lr=1e-3)) if RefADOPT is not None else None),
        # no torch.optim counterpart: the same bridge class on the CPU is the reference
        "AutoSGM": (lambda ps: tb.AutoSGM(ps), None),
        "ELRA": (lambda ps: tb.ELRA(ps, lr=1e-3), None),
        "EnhancedSGD": (lambda ps: tb.EnhancedSGD(ps, lr=0.01), None),
    }
    return ref


def _run(make, device, steps, value_loss):
    import torch
    m = _mlp(0, device)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(device)
    opt = make(list(m.parameters()))
    for _ in range(steps):
        opt.zero_grad()
        loss = _grads(m, x, device)
        if value_loss:
            opt.step(value=loss)  # a 0-d tensor: float(loss) would synchronise torch's stream here
        else:
            opt.step()
        # read right after step(): torch's next kernels on its stream must see the new parameters
        snap = [p.detach().clone() for p in m.parameters()]
    return [s.cpu() for s in snap]


def part_parity(rows):
    import torch
    import torch_bridge as tb
    dev = torch.device(DEVICE)
    steps = 6
    eps32 = 2.0 ** -24
    for name, (bridge, reference) in _factories().items():
        value_loss = name in ("ELRA", "EnhancedSGD")
        for order in ("dlpack", "sync"):
            os.environ["TORCH_BRIDGE_CUDA_ORDER"] = order  # read when the bridge builds its buffers
            t0 = time.perf_counter()
            try:
                got = _run(bridge, dev, steps, value_loss)
                if reference is not None:
                    want = _run(reference, dev, steps, value_loss=False)
                    against = "torch (CUDA)"
                else:
                    # the CPU run takes the ordinary loss path (no slow-gradient chain); same math
                    want = _run(bridge, torch.device("cpu"), steps, value_loss)
                    against = "bridge (CPU)"
                scale = max(1.0, max(float(w.abs().max()) for w in want))
                err = max(float((g - w).abs().max()) for g, w in zip(got, want))
                # error model (float32): each step's update differs by op order / FMA contraction / XLA vs
                # torch transcendental (rsqrt, exp) by a few ulp of θ and of the update, and the f32 constant
                # 1 - f32(β2) moves Adam-type updates by 1.3e-5 relative (lr · 1.3e-5 per step); the CPU
                # references add reductions summed in another order (n ≈ 2e4: ≲ 64 ulp). Bound: per step
                # 64 ulp of the scale plus 2e-5 · lr-sized updates (lr ≤ 0.05), summed over the steps.
                tol = steps * (64 * eps32 * scale + 2e-5 * 0.05)
                ok = err <= tol and all(bool(torch.isfinite(g).all()) for g in got)
                rows.append(dict(part="parity", what=f"{name} [{order}] vs {against}", ok=ok,
                                 value=f"max|Δθ| {err:.2e} (tol {tol:.1e})",
                                 seconds=round(time.perf_counter() - t0, 1)))
            except Exception as exc:  # noqa: BLE001  (a row per failure; the other classes still run)
                rows.append(dict(part="parity", what=f"{name} [{order}]", ok=False,
                                 value=f"{type(exc).__name__}: {str(exc)[:120]}",
                                 seconds=round(time.perf_counter() - t0, 1)))
    os.environ.pop("TORCH_BRIDGE_CUDA_ORDER", None)
    # the CPU path never takes the CUDA branch
    p = torch.nn.Parameter(torch.zeros(4))
    buf = tb.Adam([p])._runtime[0].buffers[0]
    rows.append(dict(part="parity", what="CPU buffer has no CUDA order", ok=buf._cuda_order is None, value="", seconds=0))
    # flat buffers on the device, 256-byte aligned
    qs = [torch.nn.Parameter(torch.zeros(5, device=dev)), torch.nn.Parameter(torch.zeros(7, device=dev))]
    b = tb.Adam(qs)._runtime[0].buffers[0]
    rows.append(dict(part="parity", what="CUDA flat buffer on device, 256-B aligned", seconds=0,
                     ok=(b.flat_p.device == qs[0].device and b.flat_p.data_ptr() % 256 == 0
                         and b.flat_g.data_ptr() % 256 == 0 and all(q.data_ptr() % 256 == 0 for q in qs)),
                     value=f"order {b._cuda_order}, preallocate={os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE')}"))


# ---------------------------------------------------------------------------------------------------------
# semantics tests on CUDA
# ---------------------------------------------------------------------------------------------------------


def part_semantics(rows, timeout):
    env = {**os.environ, "TORCH_BRIDGE_TEST_DEVICE": "cuda", "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-m", "not slow", "tests/torch_bridge/test_torch_semantics.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr[-200:]
    failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    rows.append(dict(part="semantics", what="test_torch_semantics.py on cuda", ok=proc.returncode == 0,
                     value=summary[:150], seconds=round(time.perf_counter() - t0, 1)))
    for ln in failed[:15]:
        rows.append(dict(part="semantics", what=ln[:110], ok=False, value="", seconds=0))


# ---------------------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------------------


def _shapes(total, count):
    """``count`` tensor shapes of about ``total`` parameters: matrices (d, d) and vectors (d,) alternating."""
    per_pair = total / (count // 2)
    d = int((per_pair) ** 0.5)
    shapes = []
    for _ in range(count // 2):
        shapes += [(d, d - 1), (d,)]
    return shapes


def part_bench(rows, rounds=15, budget_s=85.0):
    import torch
    import torch_bridge as tb
    dev = torch.device(DEVICE)
    start = time.perf_counter()
    for label, total, count in (("100M/200", 100_000_000, 200), ("10M/1000", 10_000_000, 1000)):
        shapes = _shapes(int(total * SCALE), count)
        n = sum(int(torch.Size(s).numel()) for s in shapes)
        g = torch.Generator(dev).manual_seed(0)
        base = [torch.randn(s, device=dev, generator=g) * 0.02 for s in shapes]
        grads = [torch.randn(s, device=dev, generator=g) * 1e-3 for s in shapes]
        makers = {  # name: (factory, TORCH_BRIDGE_CUDA_ORDER while it builds its buffers)
            "torch fused": (lambda ps: torch.optim.Adam(ps, lr=1e-4, fused=True), ""),
            "torch foreach": (lambda ps: torch.optim.Adam(ps, lr=1e-4, foreach=True), ""),
            "bridge copy [sync]": (lambda ps: tb.Adam(ps, lr=1e-4), "sync"),
            "bridge copy [dlpack]": (lambda ps: tb.Adam(ps, lr=1e-4), "dlpack"),
            "bridge swap [sync]": (lambda ps: tb.Adam(ps, lr=1e-4, write_back="swap"), "sync"),
        }
        variants = {}
        for name, (make, order) in makers.items():
            ps = [torch.nn.Parameter(b.clone()) for b in base]
            os.environ["TORCH_BRIDGE_CUDA_ORDER"] = order
            try:
                opt = make(ps)
            except ValueError as exc:  # dlpack order where the JAX device has no handshake stream
                rows.append(dict(part="bench", what=f"Adam {label} {name}", ok=False, value=str(exc)[:150],
                                 seconds=0))
                continue
            finally:
                os.environ.pop("TORCH_BRIDGE_CUDA_ORDER", None)
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            variants[name] = (opt, ps)

        def one(name):
            opt, _ = variants[name]
            _sync()
            t = time.perf_counter()
            opt.step()  # grads kept (as after a backward): the same work each step
            _sync()
            return time.perf_counter() - t

        for name in variants:  # warm-up (compiles the JAX steps)
            for _ in range(3):
                one(name)
        samples = {name: [] for name in variants}
        names = list(variants)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                samples[name].append(one(name))
            if time.perf_counter() - start > budget_s:
                break
        med = {k: statistics.median(v) for k, v in samples.items()}
        ref = variants["torch fused"][1]
        for name in names:
            dtheta = max(float((a - b).detach().abs().max()) for a, b in zip(variants[name][1], ref))
            rows.append(dict(part="bench", what=f"Adam {label} ({n / 1e6:.3g}M) {name}", ok=True,
                             value=f"{med[name] * 1e3:.3f} ms/step, x{med[name] / med['torch fused']:.2f} fused, "
                                   f"max|Δθ| vs fused {dtheta:.1e} ({len(samples[name])} rounds)",
                             seconds=0))
        del variants, base, grads
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------


def run_part(part: str, out: str) -> int:
    rows = []
    try:
        if part == "parity":
            part_parity(rows)
        elif part == "semantics":
            part_semantics(rows, PART_TIMEOUTS["semantics"] - 10)
        elif part == "bench":
            part_bench(rows)
        else:
            raise ValueError(f"unknown part {part!r}")
    except Exception as exc:  # noqa: BLE001
        rows.append(dict(part=part, what="crashed", ok=False, value=f"{type(exc).__name__}: {str(exc)[:150]}",
                         seconds=0))
    with open(out, "w") as f:
        json.dump(rows, f)
    return 0


def table(rows) -> str:
    w = max([len(r["what"]) for r in rows] + [10])
    lines = [f"{'part':<9} {'check':<{w}} {'ok':<4} {'s':>6}  result", "-" * (w + 60)]
    for r in rows:
        lines.append(f"{r['part']:<9} {r['what']:<{w}} {'ok' if r['ok'] else 'FAIL':<4} {r['seconds']:>6}  {r['value']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=list(PART_TIMEOUTS), help="run one part (internal)")
    ap.add_argument("--out", help="where --part writes its rows (internal)")
    ap.add_argument("--parts", default=",".join(PART_TIMEOUTS), help="comma-separated parts to run")
    args = ap.parse_args(argv)
    if args.part:
        return run_part(args.part, args.out)
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu_check: no CUDA here, nothing was run: {problem}.", file=sys.stderr)
        return NO_CUDA
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            out = os.path.join(tmp, f"{part}.json")
            t0 = time.perf_counter()
            try:
                subprocess.run([sys.executable, os.path.abspath(__file__), "--part", part, "--out", out], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT}, timeout=PART_TIMEOUTS[part])
                with open(out) as f:
                    rows += json.load(f)
            except subprocess.TimeoutExpired:
                rows.append(dict(part=part, what=f"timed out after {PART_TIMEOUTS[part]} s", ok=False, value="",
                                 seconds=round(time.perf_counter() - t0, 1)))
            except (OSError, ValueError) as exc:
                rows.append(dict(part=part, what="no result", ok=False, value=f"{type(exc).__name__}: {exc}",
                                 seconds=round(time.perf_counter() - t0, 1)))
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
