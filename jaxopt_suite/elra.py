r"""ELRA (exponential learning-rate adaption, the P2M method) with every decision taken on the device.

ELRA owns its step size. Each call receives the loss ``f`` (keyword ``value``) and the gradient ``g`` of
the whole model, treated as one global vector ``x`` (all norms and dot products run over every leaf):

* **adaptive alpha** from two successive gradients: with ``S = ⟨g, g_old⟩/‖g_old‖²``,
  ``α ← α·γ`` if ``γ(1 − S) < 1`` else ``α ← α/(1 − S)`` (MATH) / ``lr/(1 − S)`` (DNN), where the growth
  ``γ = 10⁶/(1 + d)`` is damped by retraces (``d ← d/3.9`` per accepted step);
* **retrace**: when the (best collected) loss exceeds ``mean + 5·dev`` of the running loss statistics,
  the step is undone, ``x ← x_lastgood − step·g_old``, and ``α`` shrinks (MATH: to the parabola minimum
  ``α·(½αG)/((f − f_old) + αG)``, ``G = ‖g_old‖²``);
* **dynamic batch size** (DNN mode): ``collects`` gradients are averaged before a real step; the window
  doubles when the 100-step loss means stop improving, or after 25 retraces in a statistics window;
* **dynamic weight decay**: ``g ← g + a·x`` with ``a = 2|4 · wd · 0.005·‖g‖_avg/‖x‖``; ``wd`` follows
  ``min(3·collects^0.666, √(2·valid/train − 1))`` when both losses are known;
* the **step** is ``x ← x − α·g`` in MATH mode (``classes < 2``), and ``x ← x − lr·g`` in DNN mode, with
  ``lr = min(lr_old·(2/3)^(schedule + increase), lr_old·step/warmup)``, at least ``1e-5`` and clipped
  to a step length of 10; optional heavy-ball momentum.

The state machine reproduces the PyPI package ``elra`` 0.0.5 (P2M) call for call; its defects are fixed:
non-finite loss or gradient is a retrace ("no gradient"), a first call with a non-positive or
non-finite loss is a no-op, exact zeros use IEEE results instead of raising, and the DNN learning-rate
floor ``1e-5·escape`` halves while consecutive retraces sit on it (the package re-evaluates the same point
forever there).

All control uses ``jnp.where`` and one ``lax.switch`` over {skip, collect-only, first step, accept,
retrace} that carries only scalars; the vector work is one element-wise pass per output (new parameters,
``g_old``, ``x_lastgood``, collect buffer, momentum) selecting its formula by the scalar branch, after the
few global reductions (finiteness, ⟨g, g_old⟩, ‖g‖). No host synchronisation; works under ``jit``,
``vmap`` and with sharded parameters.

References:
  A. Kleinsorge, S. Kupper, A. Fauck, F. Rothe, "ELRA: Exponential learning rate adaption gradient descent
  optimization method", arXiv:2309.06274 (2023).
  PyPI package ``elra`` 0.0.5 (TH Wildau), whose P2M path this reproduces.
  B. T. Polyak, A. B. Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J. Control
  Optim. 30(4), 1992 (the booster's parameter averaging).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _common as C
from .nonfinite import nonfinite_option

# constants of the method (doubles, as in the reference implementation)
_CLIP = 10.0  # largest step length lr·‖g‖ in DNN mode
_INV_LOG_15 = 2.4663034623764317  # 1 / ln 1.5
_MAX_SCHEDULE = 28.3943679363  # 5·ln 10 / ln 1.5: keeps (2/3)^schedule ≥ 1e-5
_DAMP_RESET = 855000.0
_RESNET50_DIM = 25549352  # the reference's special case (ImageNet ResNet-50)
_MAX_COLLECTS = 1 << 30


class ElraState(NamedTuple):
    """State of :func:`scale_by_elra`. Scalars are in the control dtype (float64 with x64, else float32).

    Attributes:
      init: no real step taken yet.  skipped: first calls ignored (non-positive / non-finite loss).
      alpha: the adaptive step factor α.  lr: DNN step size.  lr_old: lr damper.  lrs: lr schedule exponent.
      S: last ⟨g, g_old⟩/‖g_old‖².  mean_angle, mean_angle_max: α·S statistics of the 100-step block.
      last_fmean, last_dev, dev_correction: retrace threshold ``mean + 5·dev·correction``.
      g_col: mean ‖g_old‖ of the last block.  sum_f, sum_var: running loss statistics.  wd: weight decay.
      last_f: loss at the last accepted point.  init_f: first loss (DNN start threshold).
      coll_ggc: sum of ‖g_old‖ over the block.  norm_g_old: ‖g_old‖.  damp: growth damper.
      best_col: best loss of the collect window.  train_loss, valid_loss: stored losses (NaN = unset).
      escape: DNN lr-floor factor in (0, 1].
      step_cnt, step_cnt2: real-call counters (total / statistics window).  retrace2, retrace3: retraces
      in the block / window.  increase3: collect-increase phase.  last_red: windows without progress.
      collects: collect window (0 = not yet set, DNN).  min_collect, statlength: window bounds.
      ncoll: gradients collected so far.  increase: the window grew this statistics epoch.
      retrace: last real call was a retrace.  coller: next call starts a new window.
      has_lastgood: ``x_lastgood`` is valid.  floor_retrace: last retrace ended at the lr floor.
      last_moved, last_retrace: what the last call did (moved parameters / retraced).
      xaver_list: float32[6] loss means of windows without progress.
      g_old: last accepted (decayed) gradient.  x_lastgood: retrace point.  coll_grad: collect buffer
      (DNN mode, else None).  mom: momentum buffer (momentum variant, else None).
    """

    init: Any
    skipped: Any
    alpha: Any
    lr: Any
    lr_old: Any
    lrs: Any
    S: Any
    mean_angle: Any
    mean_angle_max: Any
    last_fmean: Any
    last_dev: Any
    dev_correction: Any
    g_col: Any
    sum_f: Any
    sum_var: Any
    wd: Any
    last_f: Any
    init_f: Any
    coll_ggc: Any
    norm_g_old: Any
    damp: Any
    best_col: Any
    train_loss: Any
    valid_loss: Any
    escape: Any
    step_cnt: Any
    step_cnt2: Any
    retrace2: Any
    retrace3: Any
    increase3: Any
    last_red: Any
    collects: Any
    min_collect: Any
    statlength: Any
    ncoll: Any
    increase: Any
    retrace: Any
    coller: Any
    has_lastgood: Any
    floor_retrace: Any
    last_moved: Any
    last_retrace: Any
    xaver_list: Any
    g_old: Any
    x_lastgood: Any
    coll_grad: Any
    mom: Any


_INT_FIELDS = ("skipped", "step_cnt", "step_cnt2", "retrace2", "retrace3", "increase3", "last_red", "collects",
               "min_collect", "statlength", "ncoll")
_BOOL_FIELDS = ("init", "increase", "retrace", "coller", "has_lastgood", "floor_retrace", "last_moved",
                "last_retrace")
_TREE_FIELDS = ("g_old", "x_lastgood", "coll_grad", "mom")
_FLOAT_FIELDS = tuple(f for f in ElraState._fields
                      if f not in _INT_FIELDS + _BOOL_FIELDS + _TREE_FIELDS + ("xaver_list",))

# branch indices of the vector work
_SKIP, _COLLECT, _FIRST, _ACCEPT, _RETRACE, _ACCEPT_COLLECTED = range(6)


def control_dtype() -> Any:
    """float64 when ``jax_enable_x64`` is on (needed for parity with the reference), else float32."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


# ----------------------------------------------------------------------------------------------------------
# scalar helpers (Python min/max semantics: NaN-sensitive, first argument wins ties)
# ----------------------------------------------------------------------------------------------------------


def _pmin(a, b):
    """Python ``min(a, b)``: ``b`` if ``b < a`` else ``a``."""
    return jnp.where(b < a, b, a)


def _pmax(a, b):
    """Python ``max(a, b)``: ``b`` if ``b > a`` else ``a``."""
    return jnp.where(b > a, b, a)


def _clamp(a, lo, hi):
    return _pmax(_pmin(a, hi), lo)


def _acc_dtype(dtype) -> Any:
    # 2-byte floats would lose the sum entirely; they accumulate in float32
    return jnp.float32 if jnp.dtype(dtype).itemsize <= 2 else jnp.dtype(dtype)


def _pow2_floor(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, 1/s)`` with ``s = 2^⌊log₂ x⌋`` (the exponent bits of ``x ≥ 0``, a float32/float64 scalar), capped
    so that ``1/s`` is a normal number. Both are exact powers of two."""
    # exponent fields: 2^k is bias + k, so the fields of 2^k and 2^-k sum to 2·bias
    if x.dtype == jnp.float64:
        itype, mantissa, top, two_bias = jnp.int64, 52, 2045, 2046
    else:
        itype, mantissa, top, two_bias = jnp.int32, 23, 253, 254
    field = jnp.clip(jax.lax.bitcast_convert_type(x, itype) >> mantissa, 1, top)
    s = jax.lax.bitcast_convert_type(field << mantissa, x.dtype)
    inv = jax.lax.bitcast_convert_type((jnp.asarray(two_bias, itype) - field) << mantissa, x.dtype)
    return s, inv


def _leaf_dot(la, lb, cdtype) -> jax.Array:
    """``Σ la·lb`` of one leaf in the leaf dtype (at least float32), as a ``cdtype`` scalar.

    When that sum is not finite although both leaves are (products beyond the leaf dtype's range, e.g.
    elements near 1e20 in float32), it is recomputed from the leaves divided by powers of two near their
    largest magnitudes and multiplied back in ``cdtype``: finite in float64 (x64) for every finite float32
    input. The recomputation is a conditional taken only then, so finite sums are the plain sums bit for bit.
    """
    acc = _acc_dtype(la.dtype)
    plain = jnp.sum(la * lb, dtype=acc)

    def scaled():
        sa, ia = _pow2_floor(jnp.max(jnp.abs(la)).astype(acc))
        sb, ib = (sa, ia) if la is lb else _pow2_floor(jnp.max(jnp.abs(lb)).astype(acc))
        t = jnp.sum((la.astype(acc) * ia) * (lb.astype(acc) * ib))
        return (t.astype(cdtype) * sa.astype(cdtype)) * sb.astype(cdtype)

    return jax.lax.cond(jnp.isfinite(plain), lambda: plain.astype(cdtype), scaled)


def _tree_dot(a, b, cdtype) -> jax.Array:
    """Global ⟨a, b⟩: per-leaf sums in the leaf dtype, added in the control dtype (see :func:`_leaf_dot`)."""
    total = jnp.zeros((), cdtype)
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        total = total + _leaf_dot(la, lb, cdtype)
    return total


def _tree_norm(a, cdtype) -> jax.Array:
    return jnp.sqrt(_tree_dot(a, a, cdtype))


def _axpy(u, c, v):
    """``u + c·v`` leafwise, ``c`` cast to each leaf's dtype."""
    return jax.tree.map(lambda ui, vi: ui + jnp.asarray(c).astype(vi.dtype) * vi, u, v)


def _tree_where(pred, a, b):
    return jax.tree.map(lambda ai, bi: jnp.where(pred, ai, bi), a, b)


def _wd0(weight_decay):
    """The reference maps ``wd > 0.5`` to ``1 − wd`` (so 0.9999 means 1e-4)."""
    if isinstance(weight_decay, (int, float, np.floating, np.integer)) and not isinstance(weight_decay, bool):
        wd = float(weight_decay)
        return 1.0 - wd if wd > 0.5 else wd
    wd = jnp.asarray(weight_decay)
    return jnp.where(wd > 0.5, 1 - wd, wd)


def _validate(learning_rate, weight_decay, warmup, momentum, classes, batch_size):
    if callable(learning_rate):
        raise ValueError(
            f"Invalid learning_rate: {learning_rate!r}; ELRA takes a number, not a schedule: it adapts its own "
            "step size from the angle between successive gradients, and learning_rate is only the initial "
            "step size alpha (read once, by init), so a schedule could not act on the steps (the torch "
            "bridge's ELRA likewise lets LR schedulers run on its 'lr' without effect). Pass the initial "
            "step size as a number.")
    C.check_range("learning_rate", learning_rate, gt=0.0)
    C.check_range("weight_decay", weight_decay, ge=0.0, le=1.0)
    if C.is_concrete(weight_decay):
        wd0 = _wd0(float(np.asarray(weight_decay)))
        if not 0.0 <= wd0 < 0.1:
            raise ValueError(
                f"Invalid weight_decay: {weight_decay!r}; allowed range is [0, 0.1) or (0.9, 1] "
                "(values above 0.5 mean 1 - weight_decay).")
    C.check_range("warmup", warmup, ge=0.0)
    C.check_range("momentum", momentum, ge=0.0, lt=1.0, optional=True)  # None: no momentum
    for name, value, low, meaning in (("classes", classes, 0, " (< 2: MATH mode, >= 2: DNN mode)"),
                                      ("batch_size", batch_size, 1, "")):
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            # e.g. classes=2.5 is no mode: never truncated to an int
            raise C.HyperparameterTypeError(
                f"Invalid {name}: {value!r} ({type(value).__name__}); expected a Python int >= {low}{meaning}.")
        if value < low:
            raise ValueError(f"Invalid {name}: {value!r}; expected a Python int >= {low}{meaning}.")


# ----------------------------------------------------------------------------------------------------------
# the transformation
# ----------------------------------------------------------------------------------------------------------


def _init_state(params, learning_rate, weight_decay, *, dnn: bool, momentum_on: bool) -> ElraState:
    cd = control_dtype()
    f = lambda v: jnp.asarray(v, cd)  # noqa: E731
    i = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    b = lambda v: jnp.asarray(v, bool)  # noqa: E731
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ElraState(
        init=b(True), skipped=i(0),
        alpha=jnp.asarray(learning_rate).astype(cd), lr=f(0.1), lr_old=f(1.0), lrs=f(1.0), S=f(0.0),
        mean_angle=f(0.0), mean_angle_max=f(0.0), last_fmean=f(0.0), last_dev=f(0.0), dev_correction=f(1.0),
        g_col=f(0.0), sum_f=f(0.0), sum_var=f(0.0), wd=jnp.asarray(_wd0(weight_decay)).astype(cd),
        last_f=f(0.0), init_f=f(0.0), coll_ggc=f(0.0), norm_g_old=f(0.0), damp=f(_DAMP_RESET),
        best_col=f(0.0), train_loss=f(jnp.nan), valid_loss=f(jnp.nan), escape=f(1.0),
        step_cnt=i(0), step_cnt2=i(0), retrace2=i(0), retrace3=i(0), increase3=i(0), last_red=i(0),
        collects=i(0 if dnn else 1), min_collect=i(2), statlength=i(768), ncoll=i(0),
        increase=b(False), retrace=b(False), coller=b(True), has_lastgood=b(False), floor_retrace=b(False),
        last_moved=b(False), last_retrace=b(False),
        xaver_list=jnp.zeros((6,), jnp.float32),
        g_old=zeros, x_lastgood=jax.tree.map(jnp.zeros_like, params),  # distinct buffers (donation)
        coll_grad=jax.tree.map(jnp.zeros_like, params) if dnn else None,
        mom=jax.tree.map(jnp.zeros_like, params) if momentum_on else None,
    )


def _select(pred, a: dict, b: dict) -> dict:
    """Scalar entries of ``a`` where ``pred`` else ``b``; vector trees are taken from ``b``."""
    return {k: (b[k] if k in _TREE_FIELDS else jnp.where(pred, a[k], b[k])) for k in b}


def _determine_increase(s: dict, xaver) -> dict:
    """Collect-window growth decision after a statistics epoch without progress."""
    s = dict(s)
    xl = s["xaver_list"]
    red = s["last_red"]
    x32 = xaver.astype(jnp.float32)
    grow = red >= 6
    # branch: last_red >= 6
    xl_grow = xl.at[0].set(x32)
    # branch: record and maybe reset after five windows
    xl_rec = xl.at[jnp.clip(red, 0, 5)].set(x32)
    a1 = xl_rec[0] + xl_rec[1]
    a2 = xl_rec[4] + xl_rec[5]
    b1 = (xl_rec[0] + xl_rec[1]) + xl_rec[2]
    b2 = (xl_rec[3] + xl_rec[4]) + xl_rec[5]
    reset = (red == 5) & ((a1 > a2) | (b1 > b2))
    v = _pmin(a2 * jnp.float32(0.5), b2 * jnp.float32(1.0 / 3.0))
    xl_rec = jnp.where(reset, xl_rec.at[0].set(v), xl_rec)
    s["xaver_list"] = jnp.where(grow, xl_grow, xl_rec)
    cd = s["last_fmean"].dtype
    s["last_fmean"] = jnp.where(grow, xaver, jnp.where(reset, v.astype(cd), s["last_fmean"]))
    s["increase"] = jnp.where(grow, True, s["increase"])
    s["increase3"] = jnp.where(grow, 1, s["increase3"])
    s["last_red"] = jnp.where(grow | reset, 0, red)
    return s


def _control(s: dict, *, dnn: bool, batch_size: int, wd0) -> dict:
    """Counters every real call; statistics epoch, weight decay and lr schedule every 100 calls."""
    s = dict(s)
    cd = s["alpha"].dtype
    s["step_cnt"] = s["step_cnt"] + 1
    s["step_cnt2"] = s["step_cnt2"] + 1
    block = (s["step_cnt"] % 100) == 0

    # statistics epoch (once per ~epoch of samples)
    coll_f = jnp.maximum(s["collects"], 1).astype(cd)
    q = jnp.floor(s["statlength"].astype(cd) / (coll_f * batch_size))
    modo = (jnp.maximum(q, 1.0) * 100).astype(jnp.int32)
    epoch = block & (s["step_cnt2"] >= modo)
    e = dict(s)
    dsr = 1.0 / (s["step_cnt2"] - s["retrace2"]).astype(cd)
    xaver2 = jnp.sqrt(s["sum_var"] * dsr)
    xaver = s["sum_f"] * dsr
    e["sum_f"] = jnp.zeros_like(s["sum_f"])
    e["sum_var"] = jnp.zeros_like(s["sum_var"])
    e["step_cnt2"] = jnp.zeros_like(s["step_cnt2"])
    e["retrace2"] = jnp.zeros_like(s["retrace2"])
    worse = xaver > s["last_fmean"]
    e["last_red"] = jnp.where(worse, s["last_red"] + 1, 0)
    e["last_fmean"] = jnp.where(worse, s["last_fmean"], xaver)
    i3 = s["increase3"]
    e["last_fmean"] = jnp.where(i3 == 2, xaver, e["last_fmean"])
    e["increase3"] = jnp.where(i3 == 2, 0, jnp.where(i3 == 1, 2, i3))
    e["increase"] = jnp.zeros_like(s["increase"])
    e = _determine_increase(e, xaver)
    e["last_dev"] = xaver2
    e["dev_correction"] = jnp.ones_like(s["dev_correction"])
    if dnn:
        scol = jnp.where(e["increase"], jnp.maximum(2 * e["collects"], 2), e["collects"])
        e["collects"] = jnp.maximum(e["min_collect"], jnp.minimum(scol, 6250))
    s = _select(epoch, e, s)

    # every 100 calls: weight decay, lr schedule, block statistics
    b = dict(s)
    g_col = s["coll_ggc"] * 0.01
    b["g_col"] = g_col
    vl, tl = s["valid_loss"], s["train_loss"]
    dyn = (s["wd"] != 0) & (vl > 0) & (tl > 0)
    ratio = jnp.where(dyn, 2.0 * vl / jnp.where(dyn, tl, 1.0) - 1.0, 1.0)
    bwd = jnp.where(vl <= tl, 1.0, jnp.sqrt(ratio))
    b["wd"] = jnp.where(dyn, _pmin(3.0 * s["collects"].astype(cd) ** 0.666, bwd),
                        jnp.asarray(wd0).astype(cd))
    limit = jnp.log(g_col / _CLIP) * _INV_LOG_15
    lrs = s["lrs"]
    lrs = jnp.where((s["mean_angle"] > -1.0) & (s["retrace3"] > 0), _pmax(limit, lrs - 1.0), lrs)
    lrs = jnp.where(s["mean_angle_max"] < -0.2, lrs + 1.0, _pmax(limit, lrs - 0.33))
    b["lrs"] = lrs
    b["retrace3"] = jnp.zeros_like(s["retrace3"])
    b["retrace2"] = jnp.zeros_like(s["retrace2"])
    b["mean_angle"] = jnp.zeros_like(s["mean_angle"])
    b["mean_angle_max"] = jnp.zeros_like(s["mean_angle_max"])
    b["coll_ggc"] = jnp.zeros_like(s["coll_ggc"])
    b["retrace"] = jnp.zeros_like(s["retrace"])
    return _select(block, b, s)


def _alpha_accept(s: dict, dot_g_gold, norm_g, *, dnn: bool, wf) -> dict:
    """P2M step-factor update after an accepted step (parabola growth / angle rule)."""
    s = dict(s)
    cd = s["alpha"].dtype
    ga = s["norm_g_old"] * s["norm_g_old"]
    damp = s["damp"] * (1.0 / 3.9)
    gamma = 1e6 / (1.0 + damp)
    S = jnp.where(ga == 0, 0.0, dot_g_gold / jnp.where(ga == 0, 1.0, ga))
    lr_old = jnp.sqrt(s["lr_old"])
    h = 1.0 - S
    a = jnp.where(gamma * h < 1.0, s["alpha"] * gamma, (s["lr"] if dnn else s["alpha"]) / h)
    lr = _pmin(lr_old * (2.0 / 3.0) ** (s["lrs"] + s["increase"].astype(cd)),
               lr_old * jnp.asarray(wf).astype(cd) * s["step_cnt"].astype(cd))
    lr = _pmax(1e-5 * s["escape"], lr)
    n = lr * norm_g
    lr = jnp.where(_CLIP < n, lr * (_CLIP / n), lr)
    if dnn:
        a = jnp.where(S > 0, _pmin(a, lr / jnp.abs(S)), a)
    aS = a * S
    s["mean_angle"] = s["mean_angle"] + _pmin(0.0, aS)
    s["mean_angle_max"] = _pmin(s["mean_angle_max"], aS)
    a = jnp.where(aS < -0.1, -0.1 / S, a)
    s.update(alpha=_clamp(a, 1e-8, 1e6), lr=lr, lr_old=lr_old, damp=damp, S=S, norm_g_old=norm_g)
    return s


def _alpha_retrace(s: dict, f, *, dnn: bool) -> dict:
    """P2M step-factor update on a retrace (growth damped, lr halved, MATH: parabola minimum)."""
    s = dict(s)
    damp = s["damp"]
    s["damp"] = jnp.where(damp > 1.0, jnp.where(damp < 1e6 / 16.0, damp * 16.0, _DAMP_RESET), damp + 16.0)
    s["lrs"] = _pmin(s["lrs"] + 0.4, _MAX_SCHEDULE)
    s["lr_old"] = _pmax(1e-3, s["lr_old"] * 0.5)
    s["lr"] = _pmax(1e-5 * s["escape"], s["lr"] * 0.5)
    alpha = s["alpha"]
    if not dnn:
        ga = s["norm_g_old"] * s["norm_g_old"]
        d = (f - s["last_f"]) + alpha * ga
        m = (0.5 * alpha * ga) / d
        alpha = jnp.where(m < jnp.inf, alpha * m, alpha * 0.01)
    s["alpha"] = _clamp(alpha, 1e-12, 1e6)
    return s


def _elra_core(grads, state: ElraState, params, value, *, dnn, classes, batch_size, beta, wd0, wf, special,
               force_retrace=False, train_loss=None, valid_loss=None, grad_mask=None, segments=None):
    """One ELRA call: returns ``(x_new, new_state)``."""
    if params is None:
        raise TypeError("elra: update() requires the current params (params=...).")
    if value is None:
        raise TypeError("elra: update() requires the loss as the keyword argument value=...")
    cd = state.alpha.dtype
    f = jnp.asarray(value).astype(cd).reshape(())
    # the start threshold's floor: ln(classes) in DNN mode, ln 2 in MATH mode
    log_floor = math.log(classes) if dnn else 0.6931471805599453
    if grad_mask is not None:
        # a parameter without gradient takes part with a zero gradient (it still counts in ‖x‖ and decay)
        grads = jax.tree.map(
            lambda g, m: g if m is None else jnp.where(C.per_element(jnp.asarray(m, bool), segments), g, 0),
            grads, C.leaf_masks(grad_mask, grads), is_leaf=lambda v: v is None)
    s = state._asdict()

    # 1. stored losses (NaN / None keep the stored value)
    if train_loss is not None:
        tl = jnp.asarray(train_loss).astype(cd).reshape(())
        s["train_loss"] = jnp.where(jnp.isfinite(tl), tl, s["train_loss"])
    if valid_loss is not None:
        vl = jnp.asarray(valid_loss).astype(cd).reshape(())
        s["valid_loss"] = jnp.where(jnp.isfinite(vl), vl, s["valid_loss"])

    # 2. is there a usable gradient? (x − x is 0 for finite x and NaN otherwise: one exact sum per leaf,
    # fused into a reduction, checks finiteness without materialising a boolean array)
    g_leaves = jax.tree.leaves(grads)
    finite_g = jnp.bool_(True)
    for g in g_leaves:
        finite_g = finite_g & jnp.isfinite(jnp.sum(g - g, dtype=_acc_dtype(g.dtype)))
    ok = ~jnp.asarray(force_retrace, bool) & jnp.isfinite(f) & finite_g
    half = bool(g_leaves) and all(jnp.dtype(g.dtype).itemsize == 2 for g in g_leaves)
    if half:
        big = ~(_tree_norm(grads, cd) < 65e3)
    else:
        big = jnp.bool_(False)

    # 3. a first call without a usable loss/gradient is ignored
    skip = s["init"] & (~ok | ~(f > 0) | (big if not dnn else False))

    # 4./5. collect window
    best_col = jnp.where(s["coller"], f, _pmin(f, s["best_col"]))
    collecting = s["collects"] != 0
    half_big = ok & big
    use_g = ok & ~half_big
    ncoll1 = s["ncoll"] + 1
    full = ncoll1 >= s["collects"]
    collect_only = collecting & use_g & ~full
    first_in_window = s["ncoll"] == 0
    c = 1.0 / jnp.maximum(s["collects"], 1).astype(cd)
    has_g = jnp.where(collecting, use_g, ok)

    real = dict(s)
    real["best_col"] = best_col
    real["coller"] = jnp.bool_(True)
    real["step_cnt2"] = jnp.where(collecting & ~use_g, s["step_cnt2"] + 1, s["step_cnt2"])
    real["ncoll"] = jnp.zeros_like(s["ncoll"])
    real = _control(real, dnn=dnn, batch_size=batch_size, wd0=wd0)

    start = (f < 1.1 * real["init_f"]) if dnn else jnp.bool_(True)
    accept = start & (best_col < real["last_fmean"] + 5.0 * real["last_dev"] * real["dev_correction"]) & has_g

    branch = jnp.where(skip, _SKIP, jnp.where(collect_only, _COLLECT, jnp.where(
        s["init"], _FIRST, jnp.where(accept, _ACCEPT, _RETRACE)))).astype(jnp.int32)
    # a window of one gradient (the common case) does not need to read the collect buffer
    single = ~collecting | first_in_window
    branch = jnp.where((branch == _ACCEPT) & ~single, _ACCEPT_COLLECTED, branch) if dnn else branch
    is_first = branch == _FIRST
    is_accept = (branch == _ACCEPT) | (branch == _ACCEPT_COLLECTED)
    takes_g = is_first | is_accept

    # The vector work is element-wise with scalar coefficients: every output leaf is one fused pass that
    # selects its formula by the (scalar) branch, and the reductions the scalar control needs run before
    # it. (A conditional over the vector buffers would copy every buffer a branch passes through.)
    def collected():
        """The collected mean: g·c opens a window (exactly g when collects = 1), later calls add c·g; the
        first call (collects unset) and MATH mode use g."""
        if not dnn:
            return grads

        def g_window(g, cg):
            cc = c.astype(g.dtype)
            return jnp.where(collecting, jnp.where(first_in_window, g * cc, cg + cc * g), g)

        return jax.tree.map(g_window, grads, state.coll_grad)

    # weight decay joins the gradient of a real call (never on the DNN first call, where collects is unset)
    wd_on = (real["collects"] != 0) & has_g & (real["wd"] != 0) & collecting

    def decay_coeff():
        xnorm = _tree_norm(params, cd)
        # (built inside the branch so that the collected gradient is not materialised for it)
        gnorm = jax.lax.cond(real["g_col"] > 0, lambda: real["g_col"], lambda: _tree_norm(collected(), cd))
        kappa = jnp.where(xnorm == 0, 0.0, (0.005 / jnp.where(xnorm == 0, 1.0, xnorm)) * gnorm)
        return (real["wd"] * kappa) * jnp.where(real["increase"], 4.0, 2.0)

    a_wd = jax.lax.cond(wd_on & takes_g, decay_coeff, lambda: jnp.zeros((), cd))
    g_eff = jax.tree.map(lambda gi, xi: jnp.where(wd_on, gi + a_wd.astype(gi.dtype) * xi, gi), collected(), params)

    # reductions of a real step (their values are only used when the call takes the gradient)
    if beta is None:
        # the new g_old is the effective gradient on a real step (else the old one): written first, it
        # is what the reductions and the parameter update read, so g_eff is never materialised separately
        g_old = jax.tree.map(lambda ge, go: jnp.where(takes_g, ge, go), g_eff, state.g_old)
        dot_g_gold = _tree_dot(g_old, state.g_old, cd)
        norm_g = _tree_norm(g_old, cd)
        g_step = g_old
    else:
        dot_g_gold = _tree_dot(g_eff, state.g_old, cd)
        norm_g = _tree_norm(g_eff, cd)
        g_step = g_eff
        bt = jnp.asarray(beta).astype(cd)
        mom_acc = jax.tree.map(lambda m, gi: (bt.astype(m.dtype) * m) + (1.0 - bt).astype(gi.dtype) * gi,
                               state.mom, g_eff)

        def projection():
            ell_ = _tree_dot(g_eff, mom_acc, cd) / _tree_dot(mom_acc, mom_acc, cd)
            return ell_, _tree_norm(jax.tree.map(lambda m: m * ell_.astype(m.dtype), mom_acc), cd)

        ell, norm_proj = jax.lax.cond(is_accept, projection, lambda: (jnp.zeros((), cd), jnp.zeros((), cd)))

    no_coef = dict(step=jnp.zeros((), cd), old=jnp.zeros((), cd))

    def finish(d, coef):
        d = {k: v for k, v in d.items() if k not in _TREE_FIELDS}
        out = {k: jnp.asarray(v, dtype=s[k].dtype) for k, v in d.items()}
        return out, {k: jnp.asarray(v, cd) for k, v in coef.items()}

    def br_skip():
        d = dict(s)
        d["skipped"] = s["skipped"] + 1
        d["last_moved"] = jnp.bool_(False)
        d["last_retrace"] = jnp.bool_(False)
        return finish(d, no_coef)

    def br_collect():
        d = dict(s)
        d["best_col"] = best_col
        d["coller"] = jnp.bool_(False)
        d["ncoll"] = ncoll1
        d["last_moved"] = jnp.bool_(False)
        d["last_retrace"] = jnp.bool_(False)
        return finish(d, no_coef)

    def br_first():
        d = dict(real)
        d["sum_f"] = f
        d["last_f"] = f
        d["init_f"] = _pmax(f, jnp.asarray(log_floor, cd))
        if dnn:
            mc = max(2, int(128.0 / batch_size + 0.9)) if special else 1
            d["min_collect"] = jnp.asarray(mc, jnp.int32)
            d["collects"] = jnp.asarray(mc, jnp.int32)
            if special:
                d["statlength"] = jnp.asarray(3072, jnp.int32)
        else:
            d["min_collect"] = jnp.asarray(1, jnp.int32)
            d["collects"] = jnp.asarray(1, jnp.int32)
        d["last_fmean"] = 1.1 * f
        d["last_dev"] = 0.3 * d["last_fmean"]
        d["init"] = jnp.bool_(False)
        d["norm_g_old"] = norm_g
        d["g_col"] = norm_g
        d["last_moved"] = jnp.bool_(True)
        d["last_retrace"] = jnp.bool_(False)
        return finish(d, dict(step=real["alpha"], old=jnp.zeros((), cd)))

    def br_accept():
        d = dict(real)
        d["dev_correction"] = _pmax(1.0, real["dev_correction"] * (1.0 / 1.05))
        n2 = real["step_cnt2"]
        n2f = n2.astype(cd)
        r2 = real["retrace2"]
        d["sum_f"] = real["sum_f"] + f
        h = d["sum_f"] - (n2 - r2 + 1).astype(cd) * f
        d["sum_var"] = jnp.where(n2 != 0, real["sum_var"] + h * h / (n2f * n2f), 0.0)
        early = real["step_cnt"] <= n2
        dsf = 1.0 / (n2 - r2 + 1).astype(cd)
        d["last_fmean"] = jnp.where(early, d["sum_f"] * dsf, real["last_fmean"])
        d["last_dev"] = jnp.where(early, jnp.sqrt(d["sum_var"] * dsf) * 1.05 ** r2.astype(cd), real["last_dev"])
        d["has_lastgood"] = jnp.bool_(True)
        d["last_f"] = f
        d["retrace"] = jnp.bool_(False)
        d = _alpha_accept(d, dot_g_gold, norm_g, dnn=dnn, wf=wf)
        step = d["lr"] if dnn else d["alpha"]
        d["norm_g_old"] = norm_g if beta is None else norm_proj
        d["escape"] = jnp.minimum(1.0, 2.0 * real["escape"])
        d["floor_retrace"] = jnp.bool_(False)
        d["coll_ggc"] = real["coll_ggc"] + d["norm_g_old"]
        d["last_moved"] = jnp.bool_(True)
        d["last_retrace"] = jnp.bool_(False)
        return finish(d, dict(step=step, old=jnp.zeros((), cd)))

    def br_retrace():
        d = dict(real)
        d["dev_correction"] = real["dev_correction"] * 1.05
        d["retrace"] = jnp.bool_(True)
        d["retrace2"] = real["retrace2"] + 1
        d["retrace3"] = real["retrace3"] + 1
        if dnn:
            many = (d["retrace3"] % 26) == 25
            d["last_red"] = jnp.where(many, 0, real["last_red"])
            d["collects"] = jnp.where(
                many, jnp.minimum(jnp.maximum(2 * real["collects"], 2), _MAX_COLLECTS), real["collects"])
            d["escape"] = jnp.where(real["floor_retrace"], real["escape"] * 0.5, real["escape"])
        old = real["alpha"]
        d = _alpha_retrace(d, f, dnn=dnn)
        if dnn:
            d["floor_retrace"] = d["lr"] == 1e-5 * d["escape"]
        step = d["lr"] if dnn else d["alpha"]
        d["coll_ggc"] = real["coll_ggc"] + real["norm_g_old"]
        d["last_moved"] = jnp.bool_(True)
        d["last_retrace"] = jnp.bool_(True)
        return finish(d, dict(step=step, old=old))

    # the scalar state machine: one small conditional over scalars only
    branches = [br_skip, br_collect, br_first, br_accept, br_retrace]
    if dnn:
        branches.append(br_accept)
    new, coef = jax.lax.switch(branch, branches)
    step, old, alpha = coef["step"], coef["old"], new["alpha"]
    is_retrace = branch == _RETRACE
    has_lastgood = s["has_lastgood"]
    # retrace on the second call (no x_lastgood yet): move back along g_old by the change of alpha, and
    # once more by alpha when that change rounds to alpha in float32
    a32, o32 = alpha.astype(jnp.float32), old.astype(jnp.float32)
    twice = ((a32 - o32) - a32) == 0

    def lt(v, dtype):
        return jnp.asarray(v).astype(dtype)

    def x_leaf(x, ge, go, xl, m):
        # every moving call ends in one multiply-add base + coef·dir with a product used once, so the
        # compiler contracts it to a fused multiply-add exactly as a plain axpy (and torch's add(alpha=))
        t = x.dtype
        x_a = x + lt(old - alpha, t) * go  # retrace without x_lastgood
        if beta is None:
            base_ret = jnp.where(has_lastgood, xl, jnp.where(twice, x_a, x))
            coef_ret = jnp.where(has_lastgood, -step, jnp.where(twice, -alpha, old - alpha))
            base = jnp.where(takes_g, x, base_ret)
            coef = jnp.where(takes_g, -step, coef_ret)
            # the new g_old: equal to the old one on a retrace
            return jnp.where(takes_g | is_retrace, base + lt(coef, t) * ge, x)
        # heavy ball: x − (1−β)·step·g − β·step·m (the first call steps along g alone); g_old is a separate
        # buffer here, so each formula keeps its own single-use products
        x_acc = (x + lt(-(1.0 - bt) * step, t) * ge) + lt(-bt * step, t) * m
        x_acc = jnp.where(is_first, x + lt(-step, t) * ge, x_acc)
        x_ret = jnp.where(has_lastgood, xl + lt(-step, t) * go, jnp.where(twice, x_a + lt(-alpha, t) * go, x_a))
        return jnp.where(takes_g, x_acc, jnp.where(is_retrace, x_ret, x))

    moms = state.mom if beta is not None else jax.tree.map(lambda _: None, params)
    # without momentum g_step is the new g_old, equal to the old one on a retrace
    x_new = jax.tree.map(x_leaf, params, g_step, state.g_old if beta is not None else g_step, state.x_lastgood,
                         moms, is_leaf=lambda v: v is None)

    if beta is None:
        mom = None
    else:
        g_old = jax.tree.map(lambda ge, ma, go: jnp.where(is_first, ge, jnp.where(
            is_accept, ma * ell.astype(ma.dtype), go)), g_eff, mom_acc, state.g_old)
        mom = jax.tree.map(lambda ge, ma, m: jnp.where(is_first, ge, jnp.where(is_accept, ma, m)),
                           g_eff, mom_acc, state.mom)
    x_lastgood = jax.tree.map(lambda x, xl: jnp.where(is_accept, x, xl), params, state.x_lastgood)
    if dnn:
        def coll_leaf(g, cg):
            cc = c.astype(g.dtype)
            window = jnp.where(first_in_window, g * cc, cg + cc * g)
            # an accepted single-gradient window leaves the buffer empty: zeros (g·0 keeps g's sharding)
            return jnp.where(branch == _COLLECT, window, jnp.where(branch == _ACCEPT, g * 0, cg))

        coll_grad = jax.tree.map(coll_leaf, grads, state.coll_grad)
    else:
        coll_grad = None

    x_new = jax.tree.map(lambda n, p: jnp.asarray(n, dtype=p.dtype), x_new, params)
    new.update(g_old=g_old, x_lastgood=x_lastgood, coll_grad=coll_grad, mom=mom)
    return x_new, ElraState(**new)


def _numeric_config(weight_decay, warmup, momentum) -> dict:
    """The numbers the step reads: ``wd0`` (mapped weight decay), ``wf`` (1/warmup) and ``beta``.

    Python numbers are mapped on the host in double; arrays (traced hyperparameters) on the device.
    """
    if isinstance(warmup, (int, float, np.floating, np.integer)) and not isinstance(warmup, bool):
        wf = 1.0 if warmup <= 1 else 1.0 / float(warmup)
    else:
        w = jnp.asarray(warmup)
        wf = jnp.where(w <= 1, 1.0, 1.0 / jnp.where(w <= 1, 1.0, w))
    return dict(beta=momentum, wd0=_wd0(weight_decay), wf=wf)


def _static_config(classes, batch_size, segments, params) -> dict:
    """The structural part of the step's configuration (mode, batch size, the ResNet-50 special case)."""
    dnn = classes >= 2
    if segments is not None:
        dim = sum(segments.numels)
    else:
        dim = sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params))
    return dict(dnn=dnn, classes=classes, batch_size=batch_size, special=dnn and dim == _RESNET50_DIM)


def _config(learning_rate, weight_decay, warmup, momentum, classes, batch_size, segments, params):
    # learning_rate is read by init only: the step does not depend on it
    del learning_rate
    return {**_static_config(classes, batch_size, segments, params),
            **_numeric_config(weight_decay, warmup, momentum)}


def elra_step_numeric(grads, state: ElraState, params, *, value, numeric, classes: int = 0, batch_size: int = 8,
                      force_retrace: Any = False, train_loss: Any = None, valid_loss: Any = None,
                      grad_mask: Any = None, segments: Optional[C.FlatLayout] = None):
    """:func:`elra_step` with the numeric configuration given as ``numeric = elra_numeric(...)``.

    ``numeric``'s entries may be arrays (traced arguments of a jitted step): one compiled step then serves
    every weight decay, warmup and momentum value (``learning_rate`` is read by ``init`` only). Built from
    the same Python numbers, the result is bit-identical to :func:`elra_step`.
    """
    if (classes >= 2) != (state.coll_grad is not None):
        raise ValueError(f"classes={classes} does not match the state's mode.")
    if (numeric["beta"] is not None) != (state.mom is not None):
        raise ValueError("momentum does not match the state (None vs a number).")
    cfg = {**_static_config(int(classes), int(batch_size), segments, params), **numeric}
    return _elra_core(grads, state, params, value, force_retrace=force_retrace, train_loss=train_loss,
                      valid_loss=valid_loss, grad_mask=grad_mask, segments=segments, **cfg)


def elra_numeric(weight_decay: Any = 0.0, warmup: Any = 1, momentum: Any = None, *, dtype: Any = None) -> dict:
    """The numbers an ELRA step reads, mapped on the host in double as the factory maps Python numbers.

    Returns ``{"wd0", "wf", "beta"}`` (``beta`` None without momentum) as 0-d arrays of ``dtype`` (default:
    the control dtype), for :func:`elra_step_numeric`: passing them as arguments of a jitted step keeps the
    values out of the compiled code (no recompile per value) with the results of the constants.
    """
    _validate(1.0, weight_decay, warmup, momentum, 0, 1)
    dtype = control_dtype() if dtype is None else dtype
    num = _numeric_config(float(weight_decay), warmup, None if momentum is None else float(momentum))
    return {k: None if v is None else jnp.asarray(v, dtype) for k, v in num.items()}


@C.declare_static("classes", "batch_size", "segments", init_only=("learning_rate",))
def scale_by_elra(
    learning_rate: Any = 1e-5,
    weight_decay: Any = 0.0,
    warmup: Any = 1,
    momentum: Any = None,
    *,
    classes: int = 0,
    batch_size: int = 8,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    """The ELRA step as an optax transformation; the output is ``x_new − params`` (a complete step).

    See :func:`elra` for the method and the arguments. ``update(grads, state, params, *, value,
    force_retrace=False, train_loss=None, valid_loss=None, grad_mask=None)``: ``params`` and ``value`` (the
    scalar loss at ``params``) are required. ``force_retrace=True`` undoes the last step without using the
    gradient (the loss exploded). ``train_loss``/``valid_loss``: a finite value replaces the stored one
    before the call (NaN or None keep it). ``grad_mask``: a False leaf takes part with a zero gradient.
    The update is exactly zero on calls that only collect a gradient and on ignored first calls.
    """
    _validate(learning_rate, weight_decay, warmup, momentum, classes, batch_size)
    classes, batch_size = int(classes), int(batch_size)

    def init_fn(params):
        return _init_state(params, learning_rate, weight_decay, dnn=classes >= 2, momentum_on=momentum is not None)

    def update_fn(updates, state, params=None, *, value=None, force_retrace=False, train_loss=None,
                  valid_loss=None, grad_mask=None, **extra_args):
        del extra_args
        cfg = _config(learning_rate, weight_decay, warmup, momentum, classes, batch_size, segments, params)
        x_new, new_state = _elra_core(updates, state, params, value, force_retrace=force_retrace,
                                      train_loss=train_loss, valid_loss=valid_loss, grad_mask=grad_mask,
                                      segments=segments, **cfg)
        moved = new_state.last_moved
        out = jax.tree.map(lambda n, p: jnp.where(moved, n - p, jnp.zeros_like(p)), x_new, params)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@C.declare_static("classes", "batch_size", "segments", init_only=("learning_rate",))
@nonfinite_option(value=True)
def elra(
    learning_rate: Any = 1e-5,
    weight_decay: Any = 0.0,
    warmup: Any = 1,
    momentum: Any = None,
    *,
    classes: int = 0,
    batch_size: int = 8,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ELRA (P2M): self-tuning gradient descent with retraces, dynamic batch size and dynamic weight decay.

    One call with loss ``f`` and gradient ``g`` (global vector over all leaves) does::

        collect:  ĝ ← mean of `collects` gradients (DNN mode; MATH mode uses g directly)
        decay:    ĝ ← ĝ + a·x,  a = (2 or 4)·wd·0.005·ḡ/‖x‖            (when weight_decay > 0)
        accept if  min f of the window < f̄ + 5·σ_f·c     (DNN also needs f < 1.1·f₀)
          S = ⟨ĝ, g_old⟩/‖g_old‖²,  α ← α·γ  if γ(1−S) < 1  else  α/(1−S) | lr/(1−S)
          lr = max(1e-5, min(lr_old·(2/3)^(k + inc), lr_old·t/warmup)),  lr·‖ĝ‖ ≤ 10
          x_lastgood ← x;  x ← x − η·ĝ,  η = α (MATH) | lr (DNN);  g_old ← ĝ
        else (retrace)
          α ← α·(½αG)/((f − f_last) + αG) (MATH, G = ‖g_old‖²),  lr ← lr/2,  k ← k + 0.4
          x ← x_lastgood − η·g_old

    with heavy-ball momentum ``x ← x − η((1−β)ĝ + β m)``, ``m ← βm + (1−β)ĝ``, ``g_old = proj_m ĝ`` when
    ``momentum`` is a number. Every 100 real calls the loss statistics, ``k``, ``wd`` (from the stored
    train/validation losses: ``min(3·collects^0.666, √(2·valid/train − 1))``) and, in DNN mode, the collect
    window are updated. No ``scale_by_learning_rate`` follows: ELRA owns its step size.

    Args:
      learning_rate: initial α > 0 (grows by itself; 1e-6 … 1e-4 are typical). Read by ``init`` only, so a
        schedule is rejected (ValueError) and ``jaxopt_suite.inject_hyperparams`` keeps it static: ELRA's own
        angle rule sets every later step size (elra.md §1.1, §5 D1: the bridge's LR schedulers have no effect).
        Plain ``optax.inject_hyperparams`` injects it anyway: there a changed ``state.hyperparams`` entry, or a
        schedule optax evaluates, acts through ``init`` only (its value at count 0).
      weight_decay: 0 (off) or in (0, 0.1); a value above 0.5 means ``1 − weight_decay`` (0.9999 → 1e-4).
        Dynamic decay needs ``weight_decay > 0`` and both ``train_loss`` and ``valid_loss``.
      warmup: DNN lr ramp ``lr ≤ lr_old·t/warmup`` (1 = none).
      momentum: ``None`` (plain method) or β in [0, 1) (0.0 selects the momentum variant with β = 0).
      classes: static; < 2 selects MATH mode (steps by α; deterministic problems), ≥ 2 DNN mode (steps by
        the clipped lr, collects gradients). Use the number of classes for classifiers.
      batch_size: static; the caller's batch size (sizes the statistics window).
      segments: flat layout of the torch bridge (only global reductions are used, so it changes nothing).

    The keyword-only option ``nonfinite`` (added by :func:`jaxopt_suite.nonfinite.nonfinite_option`):
    ``"propagate"`` (default) is ELRA's own rule, a non-finite loss or gradient is a retrace (the state moves:
    α shrinks, retrace counters advance; an ignored first call counts in ``skipped``). ``"skip"``: such a call
    changes nothing, α and the statistics included, and counts in ``SkipNonFiniteState.skips`` (the loss is
    checked too). ``"raise"``: ``FloatingPointError`` naming the leaf or the loss.

    Extra args of ``update``: ``value`` (required), ``force_retrace``, ``train_loss``, ``valid_loss``,
    ``grad_mask``; others are ignored.

    References:
      Kleinsorge, Kupper, Fauck, Rothe, "ELRA: Exponential learning rate adaption gradient descent
      optimization method", arXiv:2309.06274 (2023); PyPI ``elra`` 0.0.5 (reproduced call for call).
    """
    return scale_by_elra(learning_rate, weight_decay, warmup, momentum, classes=classes, batch_size=batch_size,
                         segments=segments)


def elra_step(grads, state: ElraState, params, *, value, learning_rate: Any = 1e-5, weight_decay: Any = 0.0,
              warmup: Any = 1, momentum: Any = None, classes: int = 0, batch_size: int = 8,
              force_retrace: Any = False, train_loss: Any = None, valid_loss: Any = None, grad_mask: Any = None,
              segments: Optional[C.FlatLayout] = None):
    """The ELRA call of :func:`elra` returning ``(x_new, new_state)``, the new parameters exactly.

    The configuration arguments must be those the state was created with (``elra(...).init``).
    """
    _validate(learning_rate, weight_decay, warmup, momentum, classes, batch_size)
    if (classes >= 2) != (state.coll_grad is not None):
        raise ValueError(f"classes={classes} does not match the state's mode.")
    if (momentum is not None) != (state.mom is not None):
        raise ValueError("momentum does not match the state (None vs a number).")
    cfg = _config(learning_rate, weight_decay, warmup, momentum, int(classes), int(batch_size), segments, params)
    return _elra_core(grads, state, params, value, force_retrace=force_retrace, train_loss=train_loss,
                      valid_loss=valid_loss, grad_mask=grad_mask, segments=segments, **cfg)


def elra_next_call_is_real_step(state: ElraState):
    """``(real, collects)``: whether the next call with a gradient takes a step (not collect-only)."""
    real = (state.collects == 0) | (state.ncoll + 1 >= state.collects)
    return real, state.collects


# ----------------------------------------------------------------------------------------------------------
# booster: cyclic equal averaging of the parameters (logging only, never feeds back)
# ----------------------------------------------------------------------------------------------------------

_BOOST_TARGET = 240


class ElraBoostState(NamedTuple):
    """Parameter averaging beside ELRA (Polyak–Ruppert style, equal weights per window).

    Attributes:
      sum, n: running sum of parameters after accepted steps and its count.
      loss_sum, loss_n: finite losses seen in the window.  epoch_steps: moving calls this epoch.
      per_epoch: windows switched from 240 steps to one per epoch (epochs were too short).
      full, has_full, full_loss: the last completed average and the mean loss of its window.
    """

    sum: Any
    n: Any
    loss_sum: Any
    loss_n: Any
    epoch_steps: Any
    per_epoch: Any
    full: Any
    has_full: Any
    full_loss: Any


def elra_boost_init(params) -> ElraBoostState:
    """An empty booster for parameters shaped like ``params``."""
    cd = control_dtype()
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ElraBoostState(sum=zeros, n=jnp.zeros((), jnp.int32), loss_sum=jnp.zeros((), cd),
                          loss_n=jnp.zeros((), jnp.int32), epoch_steps=jnp.zeros((), jnp.int32),
                          per_epoch=jnp.zeros((), bool), full=jax.tree.map(jnp.zeros_like, params),
                          has_full=jnp.zeros((), bool), full_loss=jnp.zeros((), cd))


def _boost_average(bs: ElraBoostState) -> ElraBoostState:
    cd = bs.loss_sum.dtype
    n = jnp.maximum(bs.n, 1)
    full = jax.tree.map(lambda s: s * (1.0 / n.astype(cd)).astype(s.dtype), bs.sum)
    loss = jnp.where(bs.loss_n > 0, bs.loss_sum / jnp.maximum(bs.loss_n, 1).astype(cd), 0.0)
    return bs._replace(full=full, full_loss=loss.astype(cd), has_full=jnp.bool_(True),
                       sum=jax.tree.map(jnp.zeros_like, bs.sum), n=jnp.zeros_like(bs.n),
                       loss_sum=jnp.zeros_like(bs.loss_sum), loss_n=jnp.zeros_like(bs.loss_n))


def _tree_select(pred, a: NamedTuple, b: NamedTuple):
    return type(a)(*[jax.tree.map(lambda x, y: jnp.where(pred, x, y), u, v) for u, v in zip(a, b)])


def elra_boost_update(bs: ElraBoostState, params, *, value, moved, retraced) -> ElraBoostState:
    """Record one optimizer call: ``params`` are the parameters after the call.

    A finite loss joins the window's loss mean; a moving call counts for the epoch; an accepted step adds
    ``params`` to the sum. After 240 accepted steps (unless switched to per-epoch windows) the average is
    formed.
    """
    cd = bs.loss_sum.dtype
    v = jnp.asarray(value).astype(cd).reshape(())
    fin = jnp.isfinite(v)
    moved = jnp.asarray(moved, bool)
    add = moved & ~jnp.asarray(retraced, bool)
    bs = bs._replace(
        loss_sum=jnp.where(fin, bs.loss_sum + jnp.where(fin, v, 0.0), bs.loss_sum),
        loss_n=bs.loss_n + fin.astype(jnp.int32),
        epoch_steps=bs.epoch_steps + moved.astype(jnp.int32),
        sum=jax.tree.map(lambda s, p: jnp.where(add, s + p.astype(s.dtype), s), bs.sum, params),
        n=bs.n + add.astype(jnp.int32),
    )
    ready = ~bs.per_epoch & (bs.n >= _BOOST_TARGET)
    return _tree_select(ready, _boost_average(bs), bs)


def elra_boost_result(bs: ElraBoostState):
    """Close an epoch: ``(bs, count, mean_loss, avg_params, available)``.

    ``count`` is the number of moving calls of the epoch (0 when fewer than 4: no average). When no
    240-step window completed in the epoch, averaging switches to one window per epoch.
    """
    count = bs.epoch_steps
    bs = bs._replace(epoch_steps=jnp.zeros_like(count))
    few = count < 4
    switch = ~few & ~bs.has_full & (bs.n > 0)
    per_epoch = bs.per_epoch | switch
    bs = bs._replace(per_epoch=per_epoch)
    avg = _tree_select(switch & (bs.n >= 2), _boost_average(bs), bs)
    available = ~few & avg.has_full
    out_count = jnp.where(few, 0, count)
    loss, full = avg.full_loss, avg.full
    reset = avg._replace(has_full=jnp.bool_(False), sum=jax.tree.map(jnp.zeros_like, avg.sum),
                         n=jnp.zeros_like(avg.n), loss_sum=jnp.zeros_like(avg.loss_sum),
                         loss_n=jnp.zeros_like(avg.loss_n))
    # fewer than 4 moving calls: only the available average is dropped (the running window is kept)
    reset = _tree_select(few, bs._replace(has_full=jnp.bool_(False)), reset)
    return reset, out_count, loss, full, available
