"""Parity rows for the torch-semantics family (SGD, Adam/AdamW/AMSGrad, ADOPT, Lookahead, ASGD).

Settings follow the project's torch-semantics specification (§7): 100 steps, lr 0.05 (SGD) or 1e-2
(others), μ 0.9, λ 1e-2 or 0.1, on ``quad`` (numpy gradient) and ``mlp`` (each framework's autograd),
in float64 and float32. ``maximize`` rows run on the negated problems so that they converge.

Tolerances come from the error model of :func:`parity.runner.rounding_response`: K δ with δ our
trajectory's response to one rounding per element and step, K = 8 (so they scale with the dtype, the
number of steps and each problem's conditioning). Rows against optax's Adam family in float32 use
K = 32: optax's float32 power 1 − β^t is a cancellation, a larger error than one rounding.

Every block also carries a known-wrong variant that must be more than 10× the tolerance away (except
where the float32 bar on ``quad`` is wider than the variant's distance, named in ``no_wrong``).
"""

from __future__ import annotations

import numpy as np

from jaxopt_suite._common import STACKED_FIELDS_ATTR

from .references import TorchReference, optax_lookahead, optax_tx, po, po_lookahead, torch_adopt, torch_optim
from .runner import ParityCase

STEPS = 100
GRID = [("quad", "float64"), ("quad", "float32"), ("mlp", "float64"), ("mlp", "float32")]
SHORT = {"float64": "f64", "float32": "f32"}


def _rounding(problem, dtype):
    """The error model's tolerance (:func:`parity.runner.rounding_response`, K = 8): no overrides."""
    return {}


_OPTAX_POWER = (
    "optax forms the bias correction 1 - b**t by a float32 power: at b2 = 0.999 that is a cancellation with "
    "relative error up to eps/(1 - b2**t) (about 1000 eps at t = 1, 30 eps through the square root), not "
    "one rounding per step; K = 4 x the default")


def _optax_power(problem, dtype):
    """Rows against optax's Adam family: its float32 bias correction is a larger, known error."""
    return {} if dtype == "float64" else dict(ulps=32.0, tolerance_reason=_OPTAX_POWER)


BRIDGE_REFS = ("torch", "torch_adopt")


def _rows(stem, entry, kwargs, refs, tol=_rounding, *, grid=GRID, wrong=None, problem_suffix="", steps=STEPS,
          known_issue=None, bridge=True, no_wrong=(), **extra):
    """One case per (problem, dtype) in ``grid`` and per ``(label, reference, tol_fn)`` in ``refs``.

    The known-wrong variant is attached to the first reference of each (problem, dtype) only: it measures
    the distance from *our* trajectory, which all references of that problem and dtype share; not to the
    ``(problem, dtype)`` pairs in ``no_wrong`` (where the model's bar is wider than the variant's distance).
    ``tol_fn``/``tol`` return ParityCase overrides of the error model (``{}``: the default).
    ``known_issue(label, problem, dtype)`` may return the text of a documented failure. Rows against a
    reference with torch's signature (labels in ``BRIDGE_REFS``) are also run through the torch bridge
    with the same constructor kwargs, unless ``bridge=False``.
    """
    out = []
    for problem, dtype in grid:
        for i, (label, ref, tol_fn) in enumerate(refs):
            out.append(ParityCase(
                name=f"{stem}_vs_{label}_{problem}_{SHORT[dtype]}",
                entry=entry,
                kwargs=kwargs,
                reference=ref,
                problem=problem + problem_suffix,
                dtype=dtype,
                steps=steps,
                **(tol_fn or tol)(problem, dtype),
                wrong=wrong if i == 0 and (problem, dtype) not in no_wrong else None,
                known_issue=(known_issue(label, problem, dtype) if known_issue else "") or "",
                bridge_kwargs=(dict(ref.kwargs) if bridge and label in BRIDGE_REFS
                               and isinstance(ref, TorchReference) else None),
                **extra,
            ))
    return out


# --------------------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------------------


def _sgd_cases():
    import optax

    lr = 0.05
    out = _rows(
        "sgd_dampening", "sgd", dict(learning_rate=lr, momentum=0.9, dampening=0.5, weight_decay=1e-2),
        [("torch", torch_optim("SGD", lr=lr, momentum=0.9, dampening=0.5, weight_decay=1e-2), None)],
        _rounding,
        # optax has no dampening: optax.sgd (with the same decay) is the known-wrong variant.
        wrong=optax_tx("optax.sgd", lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(lr, 0.9)),
                       learning_rate=lr, momentum=0.9),
    )
    nesterov = dict(learning_rate=lr, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)
    out += _rows(
        "sgd_nesterov_decay_maximize", "sgd", nesterov,
        [
            ("torch", torch_optim("SGD", lr=lr, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
             None),
            ("optax", optax_tx("optax.chain(scale(-1), add_decayed_weights, sgd)",
                               lambda: optax.chain(optax.scale(-1.0), optax.add_decayed_weights(0.1),
                                                   optax.sgd(lr, 0.9, nesterov=True)),
                               weight_decay=0.1, nesterov=True), None),
        ],
        _rounding,
        problem_suffix="_neg",
        # decay applied after the momentum is a different algorithm
        wrong=optax_tx("optax.chain(sgd, decay after momentum)",
                       lambda: optax.chain(optax.scale(-1.0), optax.trace(0.9, nesterov=True),
                                           optax.add_decayed_weights(0.1), optax.scale(-lr))),
    )
    # torch skips a parameter whose gradient is None: no decay, no buffer update, no step.
    out.append(ParityCase(
        name="sgd_none_grad_quad_f64", entry="sgd",
        kwargs=dict(learning_rate=lr, momentum=0.9, dampening=0.5, weight_decay=0.1),
        reference=torch_optim("SGD", lr=lr, momentum=0.9, dampening=0.5, weight_decay=0.1),
        problem="quad", dtype="float64", steps=20, none_grads={1: ("b",)},
        check=_skipped_leaf_unchanged("b", 1),
        bridge_kwargs=dict(lr=lr, momentum=0.9, dampening=0.5, weight_decay=0.1),
        note="b has a None gradient at step 2; its params and state stay put",
    ))
    return out


# --------------------------------------------------------------------------------------------------
# Adam / AdamW / AMSGrad
# --------------------------------------------------------------------------------------------------


def _skipped_leaf_unchanged(leaf, step, torch_steps=None):
    """Check: ``leaf`` did not move at ``step`` (0-based) on our side, bit for bit; with ``torch_steps``,
    torch's per-parameter ``step`` count of that leaf equals it."""

    def check(result):
        before, after = result.ours[step][leaf], result.ours[step + 1][leaf]
        assert np.array_equal(before, after), f"{leaf} moved at its skipped step"
        moved = result.ours[step + 2][leaf]
        assert not np.array_equal(after, moved), f"{leaf} did not move after its skipped step"
        if torch_steps is not None:
            opt = result.ref_side.state
            counts = [float(opt.state[p]["step"]) for p in opt.param_groups[0]["params"]]
            assert counts == torch_steps, f"torch step counts {counts} != {torch_steps}"

    return check


def _adam_cases():
    import optax

    lr = 1e-2
    out = []
    coupled = dict(learning_rate=lr, weight_decay=0.1)
    out += _rows(
        "adam_coupled_decay", "adam", coupled,
        [
            ("torch", torch_optim("Adam", lr=lr, weight_decay=0.1), None),
            ("optax", optax_tx("optax.chain(add_decayed_weights, adam)",
                               lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(lr, eps_root=0.0)),
                               weight_decay=0.1), _optax_power),
        ],
        _rounding,
        # decoupled instead of coupled decay
        wrong=optax_tx("optax.adamw", lambda: optax.adamw(lr, weight_decay=0.1), weight_decay=0.1),
    )
    out += _rows(
        "adamw_default_decay", "adamw", dict(learning_rate=lr),  # λ not passed: torch's default 1e-2
        [
            ("torch", torch_optim("AdamW", lr=lr), None),
            ("optax", optax_tx("optax.adamw(weight_decay=1e-2)", lambda: optax.adamw(lr, weight_decay=1e-2),
                               weight_decay=1e-2), _optax_power),
        ],
        _rounding,
        # optax.adamw without λ uses its own default 1e-4
        wrong=optax_tx("optax.adamw(default λ)", lambda: optax.adamw(lr)),
    )
    out += _rows(
        "amsgrad_coupled", "adam", dict(learning_rate=lr, weight_decay=0.1, amsgrad=True),
        [("torch", torch_optim("Adam", lr=lr, weight_decay=0.1, amsgrad=True), None)],
        _rounding,
        # optax.amsgrad takes the max of the bias-corrected ν̂
        wrong=optax_tx("optax.chain(add_decayed_weights, amsgrad)",
                       lambda: optax.chain(optax.add_decayed_weights(0.1), optax.amsgrad(lr))),
    )
    out += _rows(
        "amsgrad_decoupled", "adamw", dict(learning_rate=lr, weight_decay=0.1, amsgrad=True),
        [("torch", torch_optim("AdamW", lr=lr, weight_decay=0.1, amsgrad=True), None)],
        _rounding,
        wrong=optax_tx("optax.chain(scale_by_amsgrad, add_decayed_weights, lr)",
                       lambda: optax.chain(optax.scale_by_amsgrad(), optax.add_decayed_weights(0.1),
                                           optax.scale_by_learning_rate(lr))),
    )
    out += _rows(
        "adam_eps1e-3", "adam", dict(learning_rate=lr, eps=1e-3),
        [
            ("torch", torch_optim("Adam", lr=lr, eps=1e-3), None),
            ("optax", optax_tx("optax.adam(eps_root=0)", lambda: optax.adam(lr, eps=1e-3, eps_root=0.0), eps=1e-3),
             _optax_power),
        ],
        _rounding,
        # ε inside the root is a different algorithm (in float32 on quad only ~2x the model's bar away)
        wrong=optax_tx("optax.adam(eps=0, eps_root=1e-3)", lambda: optax.adam(lr, eps=0.0, eps_root=1e-3)),
        no_wrong=(("quad", "float32"),),
    )
    # float32 bias correction as torch forms it. (optax's power form 1 − β^t lands only ~10 ulps of the
    # parameters away here, well inside the error model's float32 bar on quad, so it is no sensitivity
    # variant: the optax rows above carry its error in their K instead.)
    out.append(ParityCase(
        name="adam_bias_correction_vs_torch_quad_f32", entry="adam", kwargs=dict(learning_rate=lr),
        reference=torch_optim("Adam", lr=lr), problem="quad", dtype="float32",
    ))
    out.append(ParityCase(
        name="adam_none_grad_quad_f64", entry="adam", kwargs=dict(learning_rate=lr, weight_decay=0.1),
        reference=torch_optim("Adam", lr=lr, weight_decay=0.1),
        problem="quad", dtype="float64", steps=3, none_grads={1: ("b",)},
        check=_skipped_leaf_unchanged_last("b", 1, torch_steps=[3.0, 2.0]),
        note="b has a None gradient at step 2: torch ends with a.step = 3, b.step = 2",
    ))
    return out


def _skipped_leaf_unchanged_last(leaf, step, torch_steps):
    """As :func:`_skipped_leaf_unchanged` for runs that end right after the step following the skip."""

    def check(result):
        assert np.array_equal(result.ours[step][leaf], result.ours[step + 1][leaf]), f"{leaf} moved when skipped"
        opt = result.ref_side.state
        counts = [float(opt.state[p]["step"]) for p in opt.param_groups[0]["params"]]
        assert counts == torch_steps, f"torch step counts {counts} != {torch_steps}"
        ours_counts = [int(c) for c in _leaf_counts(result.ours_side.state)]
        assert ours_counts == [int(s) for s in torch_steps], f"our per-leaf counts {ours_counts} != {torch_steps}"

    return check


def _leaf_counts(state):
    """The per-leaf step counters of an Adam chain state, in the params' leaf order (sorted keys).

    The first ``count`` that is a dict of per-leaf scalars, or a vector of them stacked in leaf order
    (a field the state class lists in ``stacked_leaf_fields``).
    """
    for s in state:
        count = getattr(s, "count", None)
        if isinstance(count, dict):
            return [count[k] for k in sorted(count)]
        if count is not None and "count" in getattr(type(s), STACKED_FIELDS_ATTR, ()):
            return list(np.asarray(count))
    raise AssertionError("no per-leaf counter in the state")


def _other_problem_cases():
    """The same rules on the chained Rosenbrock (0-d and 1-d leaves) and on the digits MLP (mini-batches)."""
    rosen = [("rosenbrock", "float64"), ("rosenbrock", "float32")]
    out = _rows(
        "sgd_momentum_decay", "sgd", dict(learning_rate=1e-3, momentum=0.9, weight_decay=1e-2),
        [("torch", torch_optim("SGD", lr=1e-3, momentum=0.9, weight_decay=1e-2), None)],
        _rounding, grid=rosen,
    )
    out += _rows(
        "adam_coupled_decay", "adam", dict(learning_rate=1e-2, weight_decay=1e-2),
        [("torch", torch_optim("Adam", lr=1e-2, weight_decay=1e-2), None)],
        _rounding, grid=rosen,
    )
    out += _rows(  # 50 mini-batches of the digits MLP (the slowest problem: ~5-10 s a row)
        "adam_coupled_decay", "adam", dict(learning_rate=1e-2, weight_decay=1e-2),
        [("torch", torch_optim("Adam", lr=1e-2, weight_decay=1e-2), None)],
        _rounding, grid=[("digits_mlp", "float64"), ("digits_mlp", "float32")], steps=50, slow=True,
    )
    return out


def cases():
    return _sgd_cases() + _adam_cases() + _other_problem_cases() + pending_cases()


# --------------------------------------------------------------------------------------------------
# ADOPT, Lookahead, ASGD: rows for optimizers of the same family that may not be registered yet. A case
# whose registry entry is missing is reported as SKIP with the reason (never as a pass).
# --------------------------------------------------------------------------------------------------


def pending_cases():
    return _adopt_cases() + _lookahead_cases() + _asgd_cases()


def _adopt_cases():
    import optax

    lr = 1e-2
    grid_f64 = [("quad", "float64"), ("mlp", "float64")]
    grid_quad = [("quad", "float64"), ("quad", "float32")]


    out = _rows(
        "adopt", "adopt", dict(learning_rate=lr),
        [
            ("torch_adopt", torch_adopt(lr=lr), None),
            ("optax", optax_tx("optax.contrib.adopt", lambda: optax.contrib.adopt(lr)), None),
            # PO clips at (s+1)^0.25; with (s-1)^0.25 passed it reproduces the official schedule
            ("po", po("ADOPT", lr=lr, clip_lambda=lambda s: (s - 1) ** 0.25), None),
        ],
        _rounding, grid=grid_f64 + [("quad", "float32")],
        # PO's default clip bound (s+1)^0.25 is off by one step; it shows only where clipping fires (mlp)
        wrong=None,
    )
    out.append(ParityCase(
        name="adopt_clipping_fires_vs_torch_adopt_mlp_f64", entry="adopt", kwargs=dict(learning_rate=lr),
        reference=torch_adopt(lr=lr), problem="mlp", dtype="float64",
        wrong=po("ADOPT", lr=lr), check=_adopt_clipped(lr),
        note="the clip bound fires on mlp; PO's default (s+1)^0.25 bound is the known-wrong variant",
    ))
    out += _rows(
        "adopt_coupled_decay", "adopt", dict(learning_rate=lr, weight_decay=0.1),
        [
            ("torch_adopt", torch_adopt(lr=lr, weight_decay=0.1), None),
            ("optax", optax_tx("optax.chain(add_decayed_weights, contrib.adopt)",
                               lambda: optax.chain(optax.add_decayed_weights(0.1), optax.contrib.adopt(lr))), None),
        ],
        _rounding, grid=grid_f64,
    )
    out += _rows(
        "adopt_decoupled_decay", "adopt", dict(learning_rate=lr, weight_decay=0.1, decouple=True),
        [("torch_adopt", torch_adopt(lr=lr, weight_decay=0.1, decouple=True), None)],
        _rounding, grid=grid_f64,
        # a chained decoupled decay fires on the first call too
        wrong=optax_tx("optax.chain(contrib.adopt, decay)",
                       lambda: optax.chain(optax.contrib.adopt(1.0), optax.add_decayed_weights(0.1),
                                           optax.scale(-lr))),
        check=_first_step_no_move(),
    )
    out += _rows(
        "adopt_no_clip", "adopt", dict(learning_rate=lr, clip_value_fn=None),
        [("torch_adopt", torch_adopt(lr=lr, clip_lambda=None), None)],
        _rounding, grid=grid_quad,
    )
    out.append(ParityCase(
        name="adopt_no_clip_vs_torch_adopt_mlp_f64", entry="adopt", kwargs=dict(learning_rate=lr, clip_value_fn=None),
        reference=torch_adopt(lr=lr, clip_lambda=None), problem="mlp", dtype="float64",
        wrong=torch_adopt(lr=lr),  # the clip fires on mlp, so the clipped rule is far away
    ))
    return out


def _first_step_no_move():
    def check(result):
        for k, v in result.ours[0].items():
            assert np.array_equal(v, result.ours[1][k]), f"{k} moved at ADOPT's first step"

    return check


def _adopt_clipped(lr):
    """Check (on the reference) that some element of ĝ = g/max(√v, ε) exceeded the bound s^0.25.

    Recomputed in numpy from the reference trajectory: v is rebuilt from the gradients the reference saw.
    """

    def check(result):
        from . import problems as P

        problem = P.get(result.case.problem)
        b2, eps = 0.9999, 1e-6
        v = None
        fired = False
        for s, obs in enumerate(result.ref[:-1]):
            params = {k: obs[k] for k in problem.init()}
            _, g = problem.value_and_grad("torch", P.as_torch(params, "float64"), s, "float64")
            g = {k: x.numpy() for k, x in g.items()}
            if v is None:
                v = {k: x * x for k, x in g.items()}
                continue
            bound = s ** 0.25
            for k in g:
                if np.any(np.abs(g[k] / np.maximum(np.sqrt(v[k]), eps)) > bound):
                    fired = True
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
        assert fired, "the clip bound never fired on this run"

    return check


def _lookahead_cases():
    import optax

    lr_sgd, lr_adam = 0.05, 1e-2
    la = dict(sync_period=5, slow_step_size=0.8)  # α ≠ 0.5, so a swapped convention shows



    out = _rows(
        "lookahead_sgd", "lookahead_sgd", dict(learning_rate=lr_sgd, momentum=0.9, **la),
        [
            ("po", po_lookahead(torch_optim("SGD", lr=lr_sgd, momentum=0.9), k=5, alpha=0.8), None),
            ("optax", optax_lookahead("optax.lookahead(sgd)",
                                      lambda: optax.lookahead(optax.sgd(lr_sgd, 0.9), 5, 0.8),
                                      sync_period=5, slow_step_size=0.8), None),
        ],
        _rounding,
        # the swapped convention (α weighting the slow weights)
        wrong=po_lookahead(torch_optim("SGD", lr=lr_sgd, momentum=0.9), k=5, alpha=0.2),
    )
    out += _rows(
        "lookahead_adam", "lookahead_adam", dict(learning_rate=lr_adam, **la),
        [
            ("po", po_lookahead(torch_optim("Adam", lr=lr_adam), k=5, alpha=0.8), None),
            ("optax", optax_lookahead("optax.lookahead(adam)",
                                      lambda: optax.lookahead(optax.adam(lr_adam, eps_root=0.0), 5, 0.8),
                                      sync_period=5, slow_step_size=0.8), _optax_power),
        ],
        _rounding,
        wrong=po_lookahead(torch_optim("Adam", lr=lr_adam), k=5, alpha=0.2),
    )
    out += _rows(
        "lookahead_adam_reset_inner", "lookahead_adam", dict(learning_rate=lr_adam, reset="inner", **la),
        [("optax", optax_lookahead("optax.lookahead(adam, reset_state=True)",
                                   lambda: optax.lookahead(optax.adam(lr_adam, eps_root=0.0), 5, 0.8,
                                                           reset_state=True),
                                   reset_state=True), _optax_power)],
        _rounding, grid=[("quad", "float64"), ("mlp", "float64")],
        # Adam restarting at t = 1 every 5 steps amplifies rounding differences as the run converges
        # (measured f64: 5e-15 at 50 steps, 2.8e-13 (quad) / 2.9e-12 (mlp) at 100): 10 syncs suffice.
        steps=50,
        wrong=optax_lookahead("optax.lookahead(adam)",
                              lambda: optax.lookahead(optax.adam(lr_adam, eps_root=0.0), 5, 0.8)),
    )
    return out


def _asgd_cases():
    lr = 1e-2

    def ax(state, params):
        from jaxopt_suite import asgd_averaged_params

        return {"ax": asgd_averaged_params(state)}


    kw = dict(learning_rate=lr, t0=10, lambd=1e-2, weight_decay=1e-3)
    ref_kw = dict(lr=lr, t0=10, lambd=1e-2, weight_decay=1e-3)
    out = _rows(
        "asgd", "asgd", kw,
        [("torch", torch_optim("ASGD", state_keys=("ax",), **ref_kw), None)],
        _rounding, extras=ax,
        # swapping in exact float64 scalars drifts from torch's float32-rounded eta and mu
    )
    out += _rows(
        "asgd_scalar_f64", "asgd", {**kw, "scalar_dtype": "float64"},
        [("torch", torch_optim("ASGD", state_keys=("ax",), default_dtype="float64", **ref_kw), None)],
        _rounding, grid=[("quad", "float64"), ("mlp", "float64")], extras=ax,
        wrong=torch_optim("ASGD", state_keys=("ax",), **ref_kw),
    )
    lr_m = 0.03125  # exact in float32
    out += _rows(
        "asgd_momentum", "asgd", dict(learning_rate=lr_m, lambd=0.0, momentum=0.9, weight_decay=1e-3),
        [("torch_sgd", torch_optim("SGD", lr=lr_m, momentum=0.9, weight_decay=1e-3), None)],
        _rounding, bridge=False,
        wrong=torch_optim("SGD", lr=lr_m, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    )
    return out
