"""The loop users run: ``zero_grad(); loss.backward(); step()`` with the bridge vs torch.optim, in ms.

Unlike :mod:`benchmarks.bridge_step` (``step()`` alone on fixed gradients), every iteration here is::

    opt.zero_grad()                     # default set_to_none=True: backward allocates fresh .grad tensors
    loss = ((model(x) - y) ** 2).mean() # forward of a real model
    loss.backward()
    opt.step()                          # timed separately as "step"

and both the step and the whole iteration are timed. Each variant (an optimizer on its own copy of the
model, same initial weights, same batch every iteration, so all trajectories agree up to rounding) runs
``warmup`` untimed iterations (the bridge compiles in the first), then ``rounds`` timed ones, round-robin
over the variants (forward order on even rounds, reverse on odd, so that no variant always follows
another). Reported: median and IQR of the step and of the iteration, and the ratio of medians to the
*fastest torch implementation* of the same optimizer (foreach or fused, whichever has the smaller median
step in this run), plus max |Δθ| to that torch run at the end (a check that both did the same updates).

Models (``--models``):

* ``10m100``: ~10M params in 100 tensors, residual MLP of 50 ``Linear(448, 448)`` (x + tanh(Wx + b) / sqrt(50)),
  batch 16;
* ``1m400``: ~1M params in 400 tensors, residual MLP of 200 ``Linear(70, 70)``, batch 16;
* ``1m6``: ~1M params in 6 tensors, MLP 1024-512-512-512 with ReLU, batch 64.

Optimizers (``--optimizers``): every torch-named bridge class against its torch.optim counterpart: SGD,
SGD with momentum 0.9, Adam, AdamW, ASGD (torch has foreach but no fused ASGD), and ADOPT: torch has no
ADOPT, so the bridge's ADOPT rows are divided by torch *Adam*'s fastest time, as a reference only (same
memory traffic class: two moments), not a like-for-like comparison. By default ``10m100`` runs Adam only
(issue 11: iteration <= 1.0x fused) and ``1m400`` / ``1m6`` run all of them (issue 14: <= 1.0x per step,
<= 1.1x per iteration; issue 11: Adam iteration <= 0.5x fused on 1m400).

Threads: ``--torch-threads`` (default 1) pins torch's intra-op pool with ``torch.set_num_threads``. On a
2-core machine XLA's CPU client keeps its own thread pool for the bridge's compiled step, and the forward
/ backward of these small models gains little from a second torch thread while contending with XLA (and,
on a shared machine, with other processes) for the same two cores; one torch thread makes the torch side
deterministic in its core use and is what bridge_grad_copy and the test suite use. Measured on the loaded 2-core
machine (see benchmarks/README.md): with 2 torch threads every variant of the 1m6 loop ran 20-80x slower, with IQRs
over two orders of magnitude (torch fused SGD-momentum step 84.7 ms, IQR 0.95-143 ms, against 0.73 ms, IQR
0.70-0.79 ms, with 1 thread right after). The torch baselines' own optimizer
kernels (fused / foreach) then run on one thread too; XLA's step may use both cores, which favours the
bridge where its loops are split into 2 tasks (the optimized HLO says so at every size here; whether that split
helps or hurts on a loaded machine was not measured: ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` does not
remove it): read the rows with that in mind, or rerun with
``--torch-threads 2`` (printed in the header, so runs are comparable only at equal settings).

``--profile`` adds a breakdown of the bridge's ``step()`` (SGD momentum and Adam on 1m6 and 1m400): the
time of each section, measured with ``time.perf_counter_ns`` around the bridge's own methods (wrapped only
in this mode; nothing is changed in the bridge), see :func:`profile_breakdown`, and with ``--cprofile`` a
cProfile listing of the bridge's step.

Timings on a loaded machine are noisy: read ratios from one run (the variants are interleaved) and the
IQR columns; the load average is printed at the start and at the end.

Run: ``python -m benchmarks.bridge_loop [--rounds 60] [--models 1m6,1m400,10m100] [--optimizers Adam,SGD]
[--torch-threads 1] [--profile] [--quick]``.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import os
import platform
import pstats
import time

import numpy as np
import torch

import torch_bridge


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


class ResMLP(torch.nn.Module):
    """``depth`` residual layers ``x + tanh(W x + b) / sqrt(depth)`` of width ``width`` (2 tensors per layer).

    The 1/sqrt(depth) branch scale keeps the activations O(1) over 200 layers; without it training with
    momentum is chaotic enough that rounding differences between implementations grow to O(1) in 70 steps
    and the max |Δθ| check below would say nothing."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.scale = depth ** -0.5

    def forward(self, x):
        for layer in self.layers:
            x = x + self.scale * torch.tanh(layer(x))
        return x


def _mlp_1m6():
    return torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 512))


# name -> (description, constructor, batch, input width, output width)
MODELS = {
    "10m100": ("~10M/100: residual MLP 50 x Linear(448, 448), batch 16", lambda: ResMLP(448, 50), 16, 448, 448),
    "1m400": ("~1M/400: residual MLP 200 x Linear(70, 70), batch 16", lambda: ResMLP(70, 200), 16, 70, 70),
    "1m6": ("~1M/6: MLP 1024-512-512-512 (ReLU), batch 64", _mlp_1m6, 64, 1024, 512),
}


# --------------------------------------------------------------------------------------------------
# optimizers: family -> (torch implementations, bridge constructor, which torch family is the reference)
# --------------------------------------------------------------------------------------------------


def _torch_impls(cls, **kw):
    """``{"fused": ctor, "foreach": ctor}`` for a torch.optim class (fused only where torch has it)."""
    out = {}
    if "fused" in inspect.signature(cls).parameters:
        out["fused"] = lambda ps: cls(ps, fused=True, **kw)
    out["foreach"] = lambda ps: cls(ps, foreach=True, **kw)
    return out


FAMILIES = {
    "SGD": (_torch_impls(torch.optim.SGD, lr=1e-2), lambda ps: torch_bridge.SGD(ps, lr=1e-2), "SGD"),
    "SGD momentum": (_torch_impls(torch.optim.SGD, lr=1e-2, momentum=0.9),
                     lambda ps: torch_bridge.SGD(ps, lr=1e-2, momentum=0.9), "SGD momentum"),
    "Adam": (_torch_impls(torch.optim.Adam, lr=1e-3), lambda ps: torch_bridge.Adam(ps, lr=1e-3), "Adam"),
    "AdamW": (_torch_impls(torch.optim.AdamW, lr=1e-3, weight_decay=1e-2),
              lambda ps: torch_bridge.AdamW(ps, lr=1e-3, weight_decay=1e-2), "AdamW"),
    "ASGD": (_torch_impls(torch.optim.ASGD, lr=1e-2), lambda ps: torch_bridge.ASGD(ps, lr=1e-2), "ASGD"),
    # torch has no ADOPT: no torch rows of its own; its ratios are to torch Adam's fastest (a reference only)
    "ADOPT": ({}, lambda ps: torch_bridge.ADOPT(ps, lr=1e-3), "Adam"),
}

DEFAULT_PLAN = {"1m6": list(FAMILIES), "1m400": list(FAMILIES), "10m100": ["Adam"]}


# --------------------------------------------------------------------------------------------------
# the interleaved loop
# --------------------------------------------------------------------------------------------------


class Variant:
    """One optimizer on its own copy of the model."""

    def __init__(self, family: str, impl: str, make_model, make_opt, x, y):
        torch.manual_seed(0)  # same initial weights for every variant
        self.family, self.impl = family, impl
        self.model = make_model()
        self.opt = make_opt(list(self.model.parameters()))
        self.x, self.y = x, y
        self.step_ms: list[float] = []
        self.iter_ms: list[float] = []
        self.fb_ms: list[float] = []

    @property
    def name(self) -> str:
        return f"{self.family}: {self.impl}"

    def iteration(self, record: bool) -> None:
        t0 = time.perf_counter_ns()
        self.opt.zero_grad()
        loss = ((self.model(self.x) - self.y) ** 2).mean()
        loss.backward()
        t1 = time.perf_counter_ns()
        self.opt.step()
        t2 = time.perf_counter_ns()
        if record:
            self.iter_ms.append((t2 - t0) * 1e-6)
            self.step_ms.append((t2 - t1) * 1e-6)
            self.fb_ms.append((t1 - t0) * 1e-6)

    def params(self):
        return [p.detach() for p in self.model.parameters()]


def _med_iqr(xs):
    q25, med, q75 = np.percentile(xs, [25, 50, 75])
    return float(med), float(q25), float(q75)


def bench_model(key: str, families, rounds: int, warmup: int):
    """Run the interleaved loop on model ``key`` for ``families``; print the table; return the rows."""
    desc, make_model, batch, d_in, d_out = MODELS[key]
    torch.manual_seed(1)
    x, y = torch.randn(batch, d_in), torch.randn(batch, d_out)
    variants = []
    ref_families = {FAMILIES[f][2] for f in families}
    for fam in list(dict.fromkeys(list(families) + [f for f in ref_families if f not in families])):
        impls, bridge_ctor, _ = FAMILIES[fam]
        if fam not in families and fam in ref_families:
            # only needed as the reference of another family (ADOPT -> Adam): torch rows only
            bridge_ctor = None
        for impl, ctor in impls.items():
            variants.append(Variant(fam, f"torch {impl}", make_model, ctor, x, y))
        if bridge_ctor is not None:
            variants.append(Variant(fam, "bridge", make_model, bridge_ctor, x, y))
    for r in range(warmup + rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            v.iteration(record=r >= warmup)
    n_params = sum(p.numel() for p in variants[0].model.parameters())
    n_tensors = len(list(variants[0].model.parameters()))
    print(f"\n{desc}: {n_params / 1e6:.3f}M params in {n_tensors} tensors; {len(variants)} variants interleaved, "
          f"{rounds} rounds after {warmup} warm-up iterations each")
    # fastest torch implementation per family (by median step)
    best = {}
    for v in variants:
        if v.impl.startswith("torch"):
            med = float(np.median(v.step_ms))
            if v.family not in best or med < best[v.family][0]:
                best[v.family] = (med, v)
    hdr = (f"{'variant':28s} {'step ms (IQR)':>22s} {'iter ms (IQR)':>22s} {'fwd+bwd ms':>10s} "
           f"{'step x':>7s} {'iter x':>7s} {'vs':>14s} {'max|dθ|':>9s}")
    print(hdr)
    rows = []
    for v in variants:
        ref_fam = FAMILIES[v.family][2]
        ref = best[ref_fam][1]
        s, i, fb = _med_iqr(v.step_ms), _med_iqr(v.iter_ms), float(np.median(v.fb_ms))
        ref_s, ref_i = float(np.median(ref.step_ms)), float(np.median(ref.iter_ms))
        comparable = ref_fam == v.family
        diff = (max(float((a - b).abs().max()) for a, b in zip(v.params(), ref.params()))
                if comparable else float("nan"))
        vs = f"{ref_fam} {ref.impl[6:]}" + ("" if comparable else " (ref)")
        print(f"{v.name:28s} {s[0]:8.3f} ({s[1]:.3f}-{s[2]:.3f}) {i[0]:8.3f} ({i[1]:.3f}-{i[2]:.3f}) {fb:10.3f} "
              f"{s[0] / ref_s:7.2f} {i[0] / ref_i:7.2f} {vs:>14s} {diff:9.1e}")
        rows.append(dict(model=key, family=v.family, impl=v.impl, step=s, iter=i, fwd_bwd=fb,
                         step_ratio=s[0] / ref_s, iter_ratio=i[0] / ref_i, ref=f"{ref_fam} {ref.impl}", diff=diff))
    # issue 11's goals are stated against fused Adam specifically
    fused = next((v for v in variants if v.family == "Adam" and v.impl == "torch fused"), None)
    bridge = next((v for v in variants if v.family == "Adam" and v.impl == "bridge"), None)
    if fused is not None and bridge is not None:
        print(f"Adam bridge / torch fused Adam: step {np.median(bridge.step_ms) / np.median(fused.step_ms):.2f}x, "
              f"iteration {np.median(bridge.iter_ms) / np.median(fused.iter_ms):.2f}x")
    return rows


# --------------------------------------------------------------------------------------------------
# where the bridge's step time goes
# --------------------------------------------------------------------------------------------------


class _Sections:
    """Accumulates ``perf_counter_ns`` per named section."""

    def __init__(self):
        self.ns: dict[str, list[int]] = {}
        self.cur: dict[str, int] = {}

    def add(self, name, dt):
        self.cur[name] = self.cur.get(name, 0) + dt

    def end_iteration(self):
        for k, v in self.cur.items():
            self.ns.setdefault(k, []).append(v)
        self.cur = {}


def _wrap(sections, name, fn):
    def wrapped(*a, **k):
        t0 = time.perf_counter_ns()
        try:
            return fn(*a, **k)
        finally:
            sections.add(name, time.perf_counter_ns() - t0)
    return wrapped


def profile_breakdown(key: str, family: str, iterations: int, warmup: int, cprofile: bool = False):
    """Median per-iteration time of each section of the bridge's ``step()`` in the real loop.

    Sections (each wraps the bridge's own method or module function; the sum of the inner ones is
    subtracted from the enclosing one, so the "Python" rows are what is left over):

    * ``sync_grads: Python loop``: per-parameter checks in :meth:`_FlatBuffer.sync_grads` (data pointers,
      grad identity, dtype/shape/stride comparisons, the marks);
    * ``sync_grads: _foreach_copy_ (grads -> flat)``: the one copy of the fresh gradients into the flat buffer;
    * ``sync_grads: _alias (set_ onto segments)``: moving each copied ``.grad`` onto its segment;
    * ``absorb_torch_edits``: the check for edited torch-side state;
    * ``jit dispatch``: the call of the jitted step until it returns (argument flattening, cache lookup,
      launch; on CPU this may include part of the execution);
    * ``XLA executable (wait)``: ``jax.block_until_ready`` on its result, i.e. the rest of the execution;
    * ``DLPack export (to_torch)``: the zero-copy torch view of the new flat parameters;
    * ``write-back copy_ + bookkeeping``: from that view to the end of the buffer's step (one ``copy_`` of
      the parameters into the torch-owned buffer, marks);
    * ``optimizer-level Python``: the rest of ``JaxOptimizer.step`` (runtime checks, hyperparameters read
      from the group, static config, the non-finite policy, ``torch.compiler.disable`` wrapper).

    The blocking wait is the only change to the step: ``to_torch`` would wait at the same place.
    """
    import jax
    import torch_bridge.dlpack as dl
    import torch_bridge._buffers as bo  # the buffers call _compiled_step through this module's name

    desc, make_model, batch, d_in, d_out = MODELS[key]
    torch.manual_seed(1)
    x, y = torch.randn(batch, d_in), torch.randn(batch, d_out)
    v = Variant(family, "bridge", make_model, FAMILIES[family][1], x, y)
    for _ in range(warmup):
        v.iteration(record=False)
    sec = _Sections()
    bufs = [b for rt in v.opt._runtime for b in rt.buffers]
    orig_step_fn, orig_to_torch, orig_foreach_copy = bo._compiled_step, dl.to_torch, torch._foreach_copy_

    def timed_step_fn(*a, **k):
        t0 = time.perf_counter_ns()
        out = orig_step_fn(*a, **k)
        t1 = time.perf_counter_ns()
        jax.block_until_ready(out)
        t2 = time.perf_counter_ns()
        sec.add("jit dispatch", t1 - t0)
        sec.add("XLA executable (wait)", t2 - t1)
        return out

    marks = {}

    def timed_to_torch(arr):
        t0 = time.perf_counter_ns()
        out = orig_to_torch(arr)
        marks["to_torch_end"] = time.perf_counter_ns()
        sec.add("DLPack export (to_torch)", marks["to_torch_end"] - t0)
        return out

    for b in bufs:
        b.sync_grads = _wrap(sec, "sync_grads total", b.sync_grads)
        b._alias = _wrap(sec, "_alias", b._alias)
        b.absorb_torch_edits = _wrap(sec, "absorb_torch_edits", b.absorb_torch_edits)
        inner_step = b.step

        def buf_step(*a, _inner=inner_step, **k):
            marks.pop("to_torch_end", None)
            t0 = time.perf_counter_ns()
            out = _inner(*a, **k)
            t1 = time.perf_counter_ns()
            sec.add("buffer step total", t1 - t0)
            if "to_torch_end" in marks:
                sec.add("write-back copy_ + bookkeeping", t1 - marks["to_torch_end"])
            return out
        b.step = buf_step
    opt_step = v.opt.step
    totals = {"step": [], "zero_grad": [], "fwd+bwd": []}
    bo._compiled_step, dl.to_torch = timed_step_fn, timed_to_torch
    torch._foreach_copy_ = _wrap(sec, "_foreach_copy_", orig_foreach_copy)
    prof = cProfile.Profile() if cprofile else None
    try:
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            v.opt.zero_grad()
            t1 = time.perf_counter_ns()
            loss = ((v.model(x) - y) ** 2).mean()
            loss.backward()
            t2 = time.perf_counter_ns()
            if prof is not None:
                prof.enable()
            opt_step()
            if prof is not None:
                prof.disable()
            t3 = time.perf_counter_ns()
            totals["zero_grad"].append(t1 - t0)
            totals["fwd+bwd"].append(t2 - t1)
            totals["step"].append(t3 - t2)
            sec.end_iteration()
    finally:
        bo._compiled_step, dl.to_torch, torch._foreach_copy_ = orig_step_fn, orig_to_torch, orig_foreach_copy
        for b in bufs:
            for name in ("sync_grads", "_alias", "absorb_torch_edits", "step"):
                b.__dict__.pop(name, None)

    missing = [k for k in ("sync_grads total", "_foreach_copy_", "jit dispatch", "DLPack export (to_torch)",
                           "buffer step total") if len(sec.ns.get(k, ())) != iterations]
    if missing:
        # the wrapped names moved (e.g. the bridge was split into modules): fail rather than print zeros
        raise RuntimeError(f"profile_breakdown: sections {missing} were not timed at every step; the bridge no "
                           "longer calls the functions wrapped here (torch_bridge._buffers._compiled_step, "
                           "torch_bridge.dlpack.to_torch, buffer.sync_grads/step): update the wrappers")

    def per_iter(name):
        return np.asarray(sec.ns.get(name, [0] * iterations), dtype=np.float64) * 1e-6

    step_i = np.asarray(totals["step"], dtype=np.float64) * 1e-6
    # derived per iteration (each inner section lies inside its enclosing one), then the median of each
    parts = {
        "sync_grads: Python loop": per_iter("sync_grads total") - per_iter("_foreach_copy_") - per_iter("_alias"),
        "sync_grads: _foreach_copy_ (grads -> flat)": per_iter("_foreach_copy_"),
        "sync_grads: _alias (set_ onto segments)": per_iter("_alias"),
        "absorb_torch_edits": per_iter("absorb_torch_edits"),
        "buffer step: Python before the call": per_iter("buffer step total") - per_iter("jit dispatch")
        - per_iter("XLA executable (wait)") - per_iter("DLPack export (to_torch)")
        - per_iter("write-back copy_ + bookkeeping"),
        "jit call (dispatch; may run the executable inline)": per_iter("jit dispatch"),
        "XLA executable (wait after the call)": per_iter("XLA executable (wait)"),
        "DLPack export (to_torch)": per_iter("DLPack export (to_torch)"),
        "write-back copy_ + bookkeeping": per_iter("write-back copy_ + bookkeeping"),
    }
    parts["optimizer-level Python (rest of step)"] = step_i - sum(parts.values())
    parts["= JAX step (jit call + wait)"] = per_iter("jit dispatch") + per_iter("XLA executable (wait)")
    rows = [(k, float(np.median(v))) for k, v in parts.items()]
    step = float(np.median(step_i))
    n_tensors = len(list(v.model.parameters()))
    print(f"\nbridge {family} step() breakdown, {desc} ({n_tensors} tensors), median over {iterations} "
          f"iterations after {warmup} warm-up (medians per section, so they need not add up exactly)")
    print(f"{'section':52s} {'ms':>8s} {'% of step':>10s}")
    for name, ms in rows:
        print(f"{name:52s} {ms:8.3f} {100 * ms / step:9.1f}%")
    print(f"{'step() total':52s} {step:8.3f}")
    print(f"{'(zero_grad, not in step)':52s} {float(np.median(totals['zero_grad'])) * 1e-6:8.3f}")
    print(f"{'(forward + backward incl. sparse-grad hooks, not in step)':52s} "
          f"{float(np.median(totals['fwd+bwd'])) * 1e-6:8.3f}")
    hlo = _hlo_summary(bufs[0], v.opt)
    print(f"compiled step (optimized HLO): {hlo}")
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        print(f"cProfile of {iterations} step() calls (sorted by own time):")
        lines = s.getvalue().splitlines()
        first = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
        print("\n".join(line for line in lines[first:] if line.strip()))
    return dict(rows), step


def _hlo_summary(buf, opt) -> str:
    """Fusions and full-size copies in the optimized HLO of ``buf``'s compiled step (memory passes per step)."""
    import re

    import torch_bridge._step_cache as bo

    group = opt.param_groups[0]
    mask = None if buf.mode == "uniform" else [np.append(buf.marks, True)]
    text = bo._compiled_step.lower(buf.scratch, buf.state, buf.jp, buf.jg, opt._hyperparams(group), mask, None,
                                   None, spec=buf.spec).compile().as_text()
    entry = text[text.index("ENTRY"):]
    n = buf.layout.total
    big = rf"f32\[{n}\]\{{0\}}"
    fusions = len(re.findall(rf"= {big} fusion\(", entry))
    copies = len(re.findall(rf"= {big} copy\(", entry))
    parts = sorted(set(re.findall(r'"outer_dimension_partitions":\["(\d+)"\]', entry)))
    return (f"{fusions} full-size fusions, {copies} full-size copies of {n} floats"
            + (f", loops split into {'/'.join(parts)} parallel tasks" if parts else ""))


# --------------------------------------------------------------------------------------------------


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import jax
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return (f"{cpu}, {cores} cores available, {platform.python_implementation()} {platform.python_version()}, "
            f"torch {torch.__version__}, jax {jax.__version__}, torch threads {torch.get_num_threads()}, "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--models", default="1m6,1m400,10m100", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--optimizers", default=None,
                    help="comma-separated families (" + ", ".join(FAMILIES) + "); default: all on 1m6 and "
                         "1m400, Adam on 10m100")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (see the docstring)")
    ap.add_argument("--profile", action="store_true",
                    help="also the step() breakdown (SGD momentum and Adam, or those of them in --optimizers)")
    ap.add_argument("--cprofile", action="store_true", help="with --profile: a cProfile listing as well")
    ap.add_argument("--profile-iterations", type=int, default=200)
    ap.add_argument("--quick", action="store_true",
                    help="short run: 6 rounds after 2 warm-up iterations, 12 profiled iterations")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.profile_iterations = 6, 2, 12
    torch.set_num_threads(args.torch_threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown model {m!r} (known: {', '.join(MODELS)})")
    fams = None
    if args.optimizers:
        fams = [f.strip() for f in args.optimizers.split(",") if f.strip()]
        for f in fams:
            if f not in FAMILIES:
                raise SystemExit(f"--optimizers: unknown family {f!r} (known: {', '.join(FAMILIES)})")
    print("start:", machine_line())
    rows = []
    for m in models:
        rows += bench_model(m, fams if fams is not None else DEFAULT_PLAN[m], args.rounds, args.warmup)
    profiles = {}
    if args.profile:
        # SGD momentum and Adam (those of them named by --optimizers, when given)
        prof_fams = [f for f in ("SGD momentum", "Adam") if fams is None or f in fams] or ["SGD momentum", "Adam"]
        for m in [m for m in ("1m6", "1m400") if m in models]:
            for fam in prof_fams:
                profiles[(m, fam)] = profile_breakdown(m, fam, args.profile_iterations, args.warmup,
                                                       cprofile=args.cprofile)
    print("\nend:  ", machine_line())
    return rows, profiles


if __name__ == "__main__":
    main()
