r"""AutoSGM: momentum as a lowpass filter, Adam's denominator as a moment estimate, schedules as windows.

Per tensor (w = parameter, g = gradient, t = this tensor's step after increment, F = :func:`filters.lowpass`)::

    g ← −g                                   (maximize)
    g ← g + λw                               (wd_level = 0, coupled, before any filtering)
    m = F(β_i, γ_i, η_i, debias)[g]          (smoothing filter: heavy ball, Nesterov, EMA...)
    d = √F(β_a, 0, 1 − β_a, debias)[(g + ε)²] + ε   if aoptlr, else 1
    u = g/d,  v = m/d
    v ← v + ((1 − β_i)/(1 − γ_i))·λw         (wd_level = 1, decoupled; later scaled by α)
    v ← HUBER(v)                             (aoptlr and num_lrc = 4)
    α = α0·W(t)                              (num_lrc ∈ {0, 4} or not aoptlr)
    α = N_t·W(t)                             (num_lrc ∈ {1, 2, 3}: an estimated numerator, below)
    update = −α·v

The learning-rate numerator N (per tensor; EMA filters without debiasing, κ = 1 + EMA_{β_n}(w²))::

    1 parcor:            a = min(|Σ β_n^k·(α0·w·v)|, α0·κ)
    2 Huberised parcor:  z = w·v, r = EMA_{β_a}(|z|); a = min(|Σ β_n^k·α0·sign(z)·min(|z|, 4r)/κ|, α0·κ)
    3 moment:            a = min(EMA_{β_n}(α0·u²), α0)
    N_t = 0.1·N_{t−1} + 0.9·mean(a)          (a fast per-tensor lowpass, pole 0.1)

HUBER (Chebyshev clip of the whole normalised step, per tensor; μ, σ² are EMAs with pole β_n)::

    μ ← EMA(‖v‖),  δ = ‖v − μ‖ + ε,  σ² ← EMA(δ²),  s = √σ² + ε,  v ← (v/δ)·min(δ, 4s)

Dtype rules: elementwise arithmetic runs in the parameter dtype T; the per-tensor learning-rate scalars
(α0, W, N, μ, σ², α) are float32 for every T and α is cast to T once; debias factors are computed in float64
when x64 is on (float32 otherwise). Nothing is reduced across tensors; the per-tensor sums (mean(a), ‖v‖,
‖v − μ‖) are formed in a fixed order (:func:`tensor_sum`), the same in the pytree and the flat layout.

float16 (whose exponent range is narrower than float32's; bfloat16 is not affected): a positive ε is raised
to float16's smallest normal number 2⁻¹⁴ ≈ 6.1e-5 (the defaults 1e-8 and 1e-10 round to 0 there, and zero
gradients would give 0/0), and the debias factors multiply in float32 before the result is rounded to
float16 (1/(1 − β^t) exceeds float16's maximum 65504 for β > 0.99998). The moment state itself is float16:
(1 − β_a)(g + ε)² underflows to 0 for |g| ≲ 8e-3 (β_a = 0.999), where the step becomes α·m/ε, finite but
larger than α; keep float32 parameters (mixed precision) for float16 training.

Classical optimizers as configurations (checked against ``torch.optim`` in the tests)::

    SGD(lr)                       aoptlr=False, beta_i=0
    SGD(lr, momentum=β)           aoptlr=False, beta_i=β, eta_i=1, debias=False
    SGD(lr, momentum=β, nesterov) aoptlr=False, beta_i=β, gamma_i=β/(1+β), eta_i=1, debias=False
                                  (first step differs: torch's first step is (1 + β) times larger)
    Adam(lr, (β1, β2), eps=0)     aoptlr=True, num_lrc=0, beta_i=β1, beta_a=β2, eta_i=0, debias=True, eps=0
    AdamW(..., weight_decay=λ)    as Adam with weight_decay=λ/(1 − β1), wd_level=1
    RMSprop(lr, alpha=β2, eps=0)  aoptlr=True, beta_i=0, beta_a=β2, debias=False, eps=0

References:
  O. Somefun, "AutoSGM: A Unified Lowpass Regularization Framework for Accelerated Learning", ICASSP 2024.
  Reference implementation github.com/somefunAgba/autosgm (README: ``lr_cfg``, ``beta_cfg``, ``rc_cfg``,
  ``wd_cfg``, ``eps_cfg``), reproduced where it agrees with its documentation.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _common as C
from ..nonfinite import nonfinite_option
from .filters import compute_dtype, is_zero, lowpass
from .windows import _is_int, autosgm_window

HUBER_CLIP = 4.0
NUMERATOR_POLE = 0.1
NUMERATOR_CONFIGS = (1, 2, 3)


class AutoSGMState(NamedTuple):
    """State of :func:`scale_by_autosgm` (absent fields are ``None``; all start at zero).

    The elementwise filter states hold the *pre-pole* sum q_t of the transposed form (the reference stores
    S_t = β·q_t; the next step forms β·q_t itself, with the same roundings), except ``grad_filter`` with a
    non-zero (or traced) γ_i, which holds S_t. Keeping q lets the output and the new state be one value,
    which avoids copies of donated state buffers.

    Attributes:
      count: per-leaf int32 step count t (the reference's per-parameter ``step``).
      grad_filter: smoothing-filter state (reference ``g_sm``, as q_t or S_t, see above).
      moment: moment-filter state of (g + ε)² (reference ``g_var`` / β_a), when ``aoptlr``.
      numerator: per-element state of the numerator estimate (reference ``pc`` / β_n), num_lrc ∈ {1, 2, 3}.
      wsq: EMA state of w² (reference ``wsq`` / β_n), num_lrc ∈ {1, 2, 3}.
      pcx: EMA state of |w·v| for the Markov clip (reference ``pcx`` / β_a), num_lrc = 2.
      lr_num: per-leaf float32 state of the pole-0.1 numerator smoother (reference ``lr_num``).
      huber_mean: per-leaf float32 EMA of ‖v‖ (reference ``cmag``), num_lrc = 4.
      huber_var: per-leaf float32 EMA of δ² (reference ``cvar``), num_lrc = 4.
    """

    count: Any
    grad_filter: Any
    moment: Any = None
    numerator: Any = None
    wsq: Any = None
    pcx: Any = None
    lr_num: Any = None
    huber_mean: Any = None
    huber_var: Any = None


def _validate(learning_rate, beta_n, beta_a, beta_i, gamma_i, eta_i, weight_decay, eps, *, aoptlr, num_lrc,
              debias, wd_level, window, maximize):
    C.check_range("learning_rate", learning_rate, gt=0.0)
    for name, value in (("beta_n", beta_n), ("beta_a", beta_a), ("beta_i", beta_i)):
        C.check_range(name, value, ge=0.0, lt=1.0)
    C.check_range("gamma_i", gamma_i, ge=0.0)
    if C.is_concrete(gamma_i) and C.is_concrete(beta_i):
        g, b = float(np.asarray(gamma_i)), float(np.asarray(beta_i))
        if g != 0.0 and not g < b:
            raise ValueError(f"Invalid gamma_i: {gamma_i!r}; the filter zero must satisfy 0 <= gamma_i < beta_i "
                             f"(= {beta_i!r}) or be 0.")
    C.check_range("eta_i", eta_i, ge=0.0)
    C.check_range("weight_decay", weight_decay, ge=0.0)
    C.check_range("eps", eps, ge=0.0)
    if not isinstance(aoptlr, (bool, np.bool_)):
        hint = " (the Huberised step is num_lrc=4)" if aoptlr == 4 else ""
        raise ValueError(f"Invalid aoptlr: {aoptlr!r}; expected a bool{hint}.")
    C.check_choice("num_lrc", num_lrc, (0, 1, 2, 3, 4))
    C.static_bool("debias", debias)
    C.check_choice("wd_level", wd_level, (0, 1))
    C.static_bool("maximize", maximize)
    if window is not None and not callable(window):
        raise ValueError(f"Invalid window: {window!r}; expected None or a callable count -> multiplier.")


def _f32(value: Any) -> jax.Array:
    return jnp.asarray(value).astype(jnp.float32)


def _in(dtype: Any, value: Any) -> jax.Array:
    """A hyperparameter (Python number: rounded once, as torch rounds a scalar) in ``dtype``."""
    return jnp.asarray(value).astype(dtype) if not isinstance(value, (int, float)) else jnp.asarray(value, dtype)


def narrow_range(dtype: Any) -> bool:
    """Whether ``dtype``'s exponent range is narrower than float32's (float16; not bfloat16, float32/64)."""
    return bool(jnp.finfo(dtype).minexp > jnp.finfo(jnp.float32).minexp)


def _eps_in(dtype: Any, eps: Any) -> jax.Array:
    """ε in ``dtype``, raised to ``dtype``'s smallest normal number where that range would round it to zero.

    ε bounds the normalised step, |m/d| ≤ |m|/ε. In float16 the defaults (1e-8, 1e-10) round to 0 and the
    moment (1 − β_a)(g + ε)² underflows to 0 for |g| ≲ 8e-3 (β_a = 0.999): d is then 0 and the step 0/0 or
    m/0. A positive ε is therefore floored at 2⁻¹⁴ ≈ 6.1e-5 in float16, which keeps |m/d| ≤ |m|·2¹⁴ finite.
    float32, float64 and bfloat16 represent every ε ≥ 1.2e-38 and are left exactly as they were.
    """
    value = _in(dtype, eps)
    if not narrow_range(dtype):
        return value
    return jnp.where(jnp.asarray(eps) > 0, jnp.maximum(value, jnp.asarray(jnp.finfo(dtype).tiny, dtype)), value)


@C.declare_static("aoptlr", "num_lrc", "debias", "wd_level", "window", "maximize", "segments")
def scale_by_autosgm(
    learning_rate: Any = 1e-2,
    beta_n: Any = 0.9999,
    beta_a: Any = 0.999,
    beta_i: Any = 0.9,
    gamma_i: Any = 0.0,
    eta_i: Any = 0.0,
    weight_decay: Any = 0.0,
    eps: Any = 1e-10,
    *,
    aoptlr: bool = True,
    num_lrc: int = 0,
    debias: bool = True,
    wd_level: int = 0,
    window: Optional[Callable[[Any], Any]] = None,
    maximize: bool = False,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The whole AutoSGM step (filters, normalisation, weight decay, numerator, window and step size).

    See the module docstring for the rule. The step size α is one float32 scalar per tensor applied once,
    so this block already includes the learning rate (it is *not* followed by ``scale_by_learning_rate``).

    Args:
      learning_rate: α0 > 0 — the constant learning rate (``aoptlr=False``) or the trust-region constant of
        the iteration-dependent learning rate (``aoptlr=True``); or an optax schedule ``count -> α0``. α0 only
        scales the step (α = α0·W(t), or the numerator estimate's α0 terms), so a time-varying α0 means what
        a torch scheduler on the bridge's ``lr`` means. The schedule is evaluated at the number of previous
        ``update`` calls (0 at the first; one global count, as ``optax.inject_hyperparams`` counts), while
        ``window`` keeps each tensor's own count; a constant schedule gives the constant's results exactly.
      beta_n: pole of the long averages of the numerator estimators (and of HUBER), in [0, 1).
      beta_a: pole of the moment (denominator) estimate, in [0, 1).
      beta_i: pole of the gradient smoothing filter, in [0, 1) (0 switches smoothing off).
      gamma_i: zero of the smoothing filter, 0 ≤ γ_i < β_i (0 heavy ball, β_i/(1 + β_i) Nesterov).
      eta_i: input gain of the smoothing filter (0 means 1 − β_i).
      weight_decay: λ ≥ 0.
      eps: ε ≥ 0, added as (g + ε)² inside the moment estimate and outside its square root.
      aoptlr: use the moment-normalised gradient and an iteration-dependent learning rate.
      num_lrc: learning-rate numerator: 0 unity, 1 parcor, 2 Huberised parcor, 3 moment, 4 unity with a
        Huberised step (``aoptlr=True`` only; ignored otherwise).
      debias: debias the smoothing and moment filter outputs.
      wd_level: 0 coupled L2 (added to g before filtering), 1 decoupled at the step level.
      window: ``None`` (W ≡ 1) or a schedule ``count -> multiplier`` (normally :func:`autosgm_window`), called
        with each tensor's own 0-based count.
      maximize: ascend (the gradient is negated first).
      segments: flat layout (the torch bridge): every leaf is a flat buffer of ``segments.total`` elements
        holding one tensor per segment; per-tensor scalars (counts, N, μ, σ²) get one entry per segment and
        the per-tensor sums become segment sums (:func:`tensor_sum`, bit-identical to the pytree layout's
        sums for layouts whose offsets are multiples of 8 elements, as the bridge's). The updates are
        bit-identical to the pytree layout's for heavy ball / Nesterov (every dtype), the moment-normalised
        step with num_lrc = 0 on tensors of rank >= 1, and every configuration in float16; otherwise they
        agree to a few ulp: XLA:CPU contracts the per-tensor scalar arithmetic (N_t, HUBER's scalars) into
        fused multiply-adds, and rewrites a 0-d leaf's divisions, differently in the two compiled programs
        (tests/jaxopt_suite/test_autosgm_flat.py bounds it). The padding gets zero updates and zero state.

    ``update(grads, state, params, *, grad_mask=None, **extra)``: ``params`` is required when
    ``weight_decay`` may be non-zero or ``num_lrc ∈ {1, 2, 3}``. A False ``grad_mask`` leaf gets a zero update
    and keeps its whole state (counter included).

    References:
      Somefun, ICASSP 2024 (AutoSGM).
    """
    return _scale_by_autosgm(learning_rate, beta_n, beta_a, beta_i, gamma_i, eta_i, weight_decay, eps,
                             aoptlr=aoptlr, num_lrc=num_lrc, debias=debias, wd_level=wd_level, window=window,
                             maximize=maximize, segments=segments)


COMPLEMENT_NAMES = ("beta_n", "beta_a", "beta_i", "gamma_i")


def _scale_by_autosgm(learning_rate, beta_n, beta_a, beta_i, gamma_i, eta_i, weight_decay, eps, *, aoptlr,
                      num_lrc, debias, wd_level, window, maximize, complements=None, segments=None):
    """:func:`scale_by_autosgm` with optional precise complements ``{"beta_n": 1 − β_n, ...}``.

    A float32-traced β close to 1 loses its complement (f32(0.9999) gives 1 − β = 1.00017e-4); callers
    that trace the β's in float32 (the torch bridge) also pass the complements formed in double.
    """
    if callable(learning_rate):  # a schedule: the block is rebuilt at each update around its value
        return C.with_schedule(
            lambda lr: _scale_by_autosgm(lr, beta_n, beta_a, beta_i, gamma_i, eta_i, weight_decay, eps,
                                         aoptlr=aoptlr, num_lrc=num_lrc, debias=debias, wd_level=wd_level,
                                         window=window, maximize=maximize, complements=complements,
                                         segments=segments),
            learning_rate)
    _validate(learning_rate, beta_n, beta_a, beta_i, gamma_i, eta_i, weight_decay, eps, aoptlr=aoptlr,
              num_lrc=num_lrc, debias=debias, wd_level=wd_level, window=window, maximize=maximize)
    complements = dict(complements or {})
    unknown = set(complements) - set(COMPLEMENT_NAMES)
    if unknown:
        raise ValueError(f"Invalid complements: {sorted(unknown)}; expected names among {COMPLEMENT_NAMES}.")
    values = {"beta_n": beta_n, "beta_a": beta_a, "beta_i": beta_i, "gamma_i": gamma_i}

    def one_minus(name):
        return complements[name] if name in complements else C.one_minus(values[name])

    aoptlr = bool(aoptlr)
    num_lrc = int(num_lrc)
    estimated = aoptlr and num_lrc in NUMERATOR_CONFIGS
    huber = aoptlr and num_lrc == 4
    needs_params = estimated or not is_zero(weight_decay)
    if segments is not None and not isinstance(segments, C.FlatLayout):
        raise ValueError(f"Invalid segments: {segments!r}; expected None or a jaxopt_suite.FlatLayout.")
    pe = functools.partial(_per_element, segments=segments)
    # padding elements of the flat layout (they belong to the dead segment): kept at exactly zero below
    live = None if segments is None else np.asarray(segments.seg_ids) != segments.num_tensors

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        per_leaf = lambda: jax.tree.map(lambda p: C.leaf_scalar(p, segments, jnp.float32, 0.0), params)  # noqa: E731
        return AutoSGMState(
            count=jax.tree.map(lambda p: C.leaf_scalar(p, segments), params),
            grad_filter=zeros(),
            moment=zeros() if aoptlr else None,
            numerator=zeros() if estimated else None,
            wsq=zeros() if estimated else None,
            pcx=zeros() if aoptlr and num_lrc == 2 else None,
            lr_num=per_leaf() if estimated else None,
            huber_mean=per_leaf() if huber else None,
            huber_var=per_leaf() if huber else None,
        )

    def leaf_step(g, w, count, grad_filter, moment, numerator, wsq, pcx, lr_num, huber_mean, huber_var):
        dtype = g.dtype
        t = C.safe_increment(count)
        if maximize:
            g = -g
        decay = None
        if needs_params and not is_zero(weight_decay):
            decay = _in(dtype, weight_decay) * w
            if wd_level == 0:
                g = g + decay
        smoothing = lambda state: lowpass(state, g, t, beta_i, gamma_i, eta_i, debias=debias,  # noqa: E731
                                          segments=segments, one_minus_beta=one_minus("beta_i"),
                                          one_minus_gamma=one_minus("gamma_i"))
        m, grad_filter_new = smoothing(grad_filter)
        if aoptlr:
            eps_t = _eps_in(dtype, eps)
            shifted = g + eps_t
            v_hat, moment = lowpass(moment, shifted * shifted, t, beta_a, 0.0, 0.0, debias=debias,
                                    segments=segments, one_minus_beta=one_minus("beta_a"))
            denom = jnp.sqrt(v_hat) + eps_t
            u, v = g / denom, m / denom
            if live is not None:
                # the padding has g = m = 0 and, with ε = 0, 0/0: its normalised values are set to 0 (what a
                # positive ε gives there), so that no NaN reaches the padding's update or state
                u, v = jnp.where(live, u, 0), jnp.where(live, v, 0)
        else:
            u, v = g, m
        if decay is not None and wd_level == 1:
            ratio = one_minus("beta_i")
            ratio = ratio / one_minus("gamma_i") if not is_zero(gamma_i) else ratio
            v = v + _in(dtype, ratio) * decay
        if huber:
            v, huber_mean, huber_var = _huber(v, huber_mean, huber_var, beta_n, eps, one_minus("beta_n"),
                                              segments, live)
        # With the parcor numerators (num_lrc 1, 2) v feeds several passes (the numerator states, the
        # per-tensor reduction, the step) and XLA stores it once. The smoothing state S_t (γ ≠ 0: the
        # stored S_t is not the output q_t) is then formed after the reduction (C.ordered_after): S_{t−1} is
        # read only by the pass that forms v, so its in-place update needs no copy of the old state.
        late_filter = estimated and not is_zero(gamma_i)
        if not late_filter:
            grad_filter = grad_filter_new
        alpha0 = _f32(learning_rate)
        win = jnp.float32(1.0) if window is None else _f32(window(count))  # per tensor (segment)
        if estimated:
            alpha0_t = alpha0.astype(dtype)
            one_minus_bn = _in(dtype, one_minus("beta_n"))
            bn = _in(dtype, beta_n)
            # pre-pole EMA states (they hold q; S = β·q is formed at the next step, see filters.lowpass)
            q_c = bn * wsq + one_minus_bn * (w * w)
            wsq = q_c
            kappa = 1.0 + q_c  # divides the clipped term of num_lrc 2 (the trust region α0·κ is formed below)
            if num_lrc == 1:
                q_p = bn * numerator + (alpha0_t * w) * v
            elif num_lrc == 2:
                z = w * v
                q_r = _in(dtype, beta_a) * pcx + _in(dtype, one_minus("beta_a")) * jnp.abs(z)
                pcx = q_r
                clipped = jnp.sign(z) * jnp.minimum(jnp.abs(z), HUBER_CLIP * q_r)
                q_p = bn * numerator + (alpha0_t * clipped) / kappa
            else:
                q_p = bn * numerator + one_minus_bn * ((alpha0_t * u) * u)
            numerator = q_p
            # a = min(|q_p|, α0·κ) (num_lrc 1, 2) or min(q_p, α0) (num_lrc 3). The reduction reads the stored
            # states q_p, q_c and forms κ, α0·κ and the clip inside its own pass. The barrier keeps XLA from
            # merging (CSE) these with the identical κ, 1 and α0 of the q_p pass: once shared, XLA:CPU writes
            # κ and the broadcast constants out as extra full-size arrays just to feed the reduction.
            if num_lrc == 3:
                q_p_stored, alpha0_r = jax.lax.optimization_barrier((q_p, alpha0_t))
                a = jnp.minimum(q_p_stored, alpha0_r)
            else:
                q_p_stored, q_c_stored, alpha0_r, one_r = jax.lax.optimization_barrier(
                    (q_p, q_c, alpha0_t, jnp.ones((), dtype)))
                a = jnp.minimum(jnp.abs(q_p_stored), alpha0_r * (one_r + q_c_stored))
            # N = f32(N_state) + f32(0.9·mean(a)): the mean is formed in T (its sum in a fixed order,
            # tensor_mean), the smoother runs in float32.
            n_new = lr_num + ((1.0 - NUMERATOR_POLE) * tensor_mean(a, segments)).astype(jnp.float32)
            lr_num = n_new * jnp.float32(NUMERATOR_POLE)
            alpha = n_new * win
        else:
            alpha = alpha0 * win
        if late_filter:
            # one entry of α (each depends on the whole reduction) orders the pass in both layouts
            _, grad_filter = smoothing(C.ordered_after(jnp.ravel(alpha)[0], grad_filter))
        update = -(pe(alpha.astype(dtype)) * v)
        return (update.astype(dtype), t, grad_filter, moment, numerator, wsq, pcx, lr_num, huber_mean,
                huber_var)

    def update_fn(updates, state, params=None, *, grad_mask=None, **extra_args):
        del extra_args
        if params is None:
            if needs_params:
                raise ValueError("autosgm: params are required by update() when weight_decay may be non-zero "
                                 "or num_lrc is 1, 2 or 3.")
            params = jax.tree.map(lambda _: None, updates)
        none_tree = jax.tree.map(lambda _: None, updates)
        fields = [state.grad_filter, state.moment, state.numerator, state.wsq, state.pcx, state.lr_num,
                  state.huber_mean, state.huber_var]
        fields = [none_tree if f is None else f for f in fields]
        res = jax.tree.map(leaf_step, updates, params, state.count, *fields, is_leaf=lambda x: x is None)
        pick = lambda i: jax.tree.map(lambda _, r: r[i], updates, res)  # noqa: E731
        new = AutoSGMState(
            count=pick(1),
            grad_filter=pick(2),
            moment=pick(3) if state.moment is not None else None,
            numerator=pick(4) if state.numerator is not None else None,
            wsq=pick(5) if state.wsq is not None else None,
            pcx=pick(6) if state.pcx is not None else None,
            lr_num=pick(7) if state.lr_num is not None else None,
            huber_mean=pick(8) if state.huber_mean is not None else None,
            huber_var=pick(9) if state.huber_var is not None else None,
        )
        new = AutoSGMState(*[None if n is None else C.masked_tree(grad_mask, n, o, segments)
                             for n, o in zip(new, state)])
        out = pick(0)
        if grad_mask is not None:
            out = jax.tree.map(lambda u, mk: u if mk is None else jnp.where(pe(jnp.asarray(mk, bool)), u,
                                                                             jnp.zeros_like(u)),
                               out, C.leaf_masks(grad_mask, out), is_leaf=lambda x: x is None)
        return out, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _per_element(value: Any, segments: Optional[C.FlatLayout]) -> jax.Array:
    """A per-tensor value (0-d, or one entry per segment) broadcast to the elements; a 0-d value shared by
    every tensor (α = α0 without window or numerator) stays 0-d."""
    value = jnp.asarray(value)
    return value if value.ndim == 0 else C.per_element(value, segments)


def _huber(v, mean, var, beta_n, eps, one_minus_bn, segments=None, live=None):
    """Chebyshev-type clip of the whole normalised step (per tensor; μ, σ² float32 states, one per segment in
    the flat layout, where the padding keeps a zero step)."""
    dtype = v.dtype
    pe = functools.partial(_per_element, segments=segments)
    bn32 = _f32(beta_n)
    norm = jnp.sqrt(tensor_sum(v * v, segments).astype(dtype))
    mean = (bn32 * mean) + (_in(dtype, one_minus_bn) * norm).astype(jnp.float32)
    centred = v - pe(mean.astype(dtype))
    if live is not None:
        centred = jnp.where(live, centred, 0)  # the padding (v = 0) is not part of any tensor's spread
    delta = jnp.sqrt(tensor_sum(centred * centred, segments).astype(dtype)) + _eps_in(dtype, eps)
    var = (bn32 * var) + (_in(dtype, one_minus_bn) * (delta * delta)).astype(jnp.float32)
    scale = jnp.sqrt(var) + _f32(eps)
    # the clipped magnitude is a per-tensor learning-rate scalar, so it is formed in float32 (as the reference)
    magnitude = jnp.minimum(delta.astype(jnp.float32), HUBER_CLIP * scale)
    # v/δ as v·(1/δ): what XLA makes of a division by a broadcast scalar in the pytree layout, written out so
    # that the flat layout (where δ is gathered per element) rounds the same way
    clipped = (v * pe(1 / delta)) * pe(magnitude.astype(dtype))
    if live is not None:
        clipped = jnp.where(live, clipped, 0)  # 0/δ of the dead segment is NaN when ε = 0
    return clipped.astype(dtype), mean, var


#: Width of the rows whose sums are the first stage of :func:`tensor_sum` (a divisor of every flat layout's
#: alignment: 64 bytes hold 8 float64, 16 float32, 32 float16 elements).
SUM_ROW = 8


def _sum_dtype(dtype: Any) -> Any:
    """The accumulation dtype of a per-tensor sum: float32 for 16-bit floats (as ``jnp.sum`` accumulates them)."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def _row_sums(rows: jax.Array) -> jax.Array:
    """Sums of the rows of an ``(R, 8)`` array by explicit pairwise halving (a fixed order of additions)."""
    while rows.shape[1] > 1:
        half = rows.shape[1] // 2
        rows = rows[:, :half] + rows[:, half:]
    return rows[:, 0]


def _row_width(segments: C.FlatLayout) -> int:
    width = SUM_ROW
    for value in (*segments.offsets, *segments.padded):
        width = math.gcd(width, int(value))
    return max(width, 1)


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x`` is split over a mesh axis of type Explicit (its sharding is part of its type)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return False
    return any(s is not None for s in jax.typeof(x).sharding.spec)


def tensor_sum(x: jax.Array, segments: Optional[C.FlatLayout] = None) -> jax.Array:
    r"""Per-tensor sum of ``x`` in an order fixed by the tensor alone: 0-d, or one sum per segment.

    The elements of each tensor, zero-padded to a multiple of 8, are summed in rows of 8 by pairwise halving
    (``((x₀+x₄)+(x₂+x₆)) + ((x₁+x₅)+(x₃+x₇))``), and the row sums are then added in row order, from 0 (a
    segment sum: XLA's scatter adds its updates one after the other). The order depends only on the
    tensor's own elements, not on where the tensor sits in a flat buffer nor on the CPU's vector width
    (``jnp.sum``'s order does), so the pytree and the flat layout give bit-identical sums (flat layouts
    whose offsets and padded sizes are multiples of 8 elements; other layouts use narrower rows). Float16
    and bfloat16 are accumulated in float32, as ``jnp.sum`` does. Error: with n elements the first stage
    contributes at most 3 roundings per element and the second ⌈n/8⌉ − 1, so
    :math:`|\hat s - s| \le (3 + \lceil n/8 \rceil)\,u \sum |x_i|` (u the unit roundoff), about 8 times
    tighter than a plain sequential sum.

    In the flat layout, the padding elements must be zero (they share a row with their tensor's tail).
    A leaf sharded over a mesh with explicit axes is summed by ``jnp.sum`` (a sharded reduction; the fixed
    row order would need the tensor gathered on every device), so there the sums agree to rounding only.
    """
    acc = _sum_dtype(x.dtype)
    x = x.astype(acc)
    if segments is None and _explicitly_sharded(x):
        return jnp.sum(x)
    if segments is None:
        flat = jnp.ravel(x)
        rows = -(-flat.shape[0] // SUM_ROW)
        if rows == 0:
            return jnp.zeros((), acc)
        flat = jnp.pad(flat, (0, rows * SUM_ROW - flat.shape[0]))
        partial = _row_sums(flat.reshape(rows, SUM_ROW))
        return jax.ops.segment_sum(partial, np.zeros(rows, np.int32), num_segments=1, indices_are_sorted=True)[0]
    width = _row_width(segments)
    partial = _row_sums(x.reshape(-1, width))
    row_ids = np.asarray(segments.seg_ids)[::width]  # each row lies in one segment's padded range
    return jax.ops.segment_sum(partial, row_ids, num_segments=segments.num_segments, indices_are_sorted=True)


def tensor_mean(x: jax.Array, segments: Optional[C.FlatLayout] = None) -> jax.Array:
    """Per-tensor mean in ``x``'s dtype: :func:`tensor_sum` over the tensor's element count (0/0 = NaN for an
    empty tensor, as ``jnp.mean``); the dead segment of the flat layout divides by 1."""
    total = tensor_sum(x, segments)
    counts = np.asarray([math.prod(x.shape)] if segments is None else segments.numels + (1,), np.float64)
    with np.errstate(divide="ignore"):
        # s·(1/n) with 1/n rounded once (what XLA makes of a division by a constant), the same in both layouts
        inverse = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), np.nan).astype(total.dtype)
    inverse = inverse.reshape(()) if segments is None else inverse
    return (total * inverse).astype(x.dtype)


@C.declare_static("aoptlr", "num_lrc", "debias", "wd_level", "window", "maximize", "segments")
@nonfinite_option()
def autosgm(
    learning_rate: Any = 1e-2,
    beta_n: Any = 0.9999,
    beta_a: Any = 0.999,
    beta_i: Any = 0.9,
    gamma_i: Any = 0.0,
    eta_i: Any = 0.0,
    weight_decay: Any = 0.0,
    eps: Any = 1e-10,
    *,
    aoptlr: bool = True,
    num_lrc: int = 0,
    debias: bool = True,
    wd_level: int = 0,
    window: Optional[Callable[[Any], Any]] = None,
    maximize: bool = False,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AutoSGM (Somefun 2024): lowpass-filtered gradient, moment-normalised, with an estimated step size.

    .. math::
        m_t = F_{\beta_i,\gamma_i,\eta_i}[g]_t,\quad d_t = \sqrt{F_{\beta_a}[(g+\epsilon)^2]_t}+\epsilon,\quad
        w_{t+1} = w_t - \alpha_t\,\frac{m_t}{d_t},\quad \alpha_t = N_t\,W(t)

    with the filter F of :mod:`jaxopt_suite.autosgm.filters`, the window W of
    :func:`~jaxopt_suite.autosgm.windows.autosgm_window`, and N_t = α0 (``num_lrc`` 0/4) or an estimated
    numerator (1 parcor, 2 Huberised parcor, 3 moment). Defaults are the reference's: α0 = 1e-2,
    β_n = 0.9999, β_a = 0.999, β_i = 0.9, γ_i = 0, η_i = 0 (→ 1 − β_i), λ = 0, ε = 1e-10, debiased.

    Examples::

        autosgm(1e-3, beta_i=0.9, aoptlr=True)                        # Adam-like (ε inside and outside)
        autosgm(1e-2, beta_i=0.9, eta_i=1.0, debias=False, aoptlr=False)   # SGD momentum 0.9
        autosgm(1e-2, beta_i=0.9, gamma_i=0.9 / 1.9, num_lrc=1,
                window=autosgm_window(1, n=2, tau=1, spe=10_000))     # NAG + parcor + cosine annealing

    ``segments=FlatLayout`` runs the same rule on flat buffers (the torch bridge's layout; see
    :func:`scale_by_autosgm` for how closely it matches the pytree layout). See :func:`scale_by_autosgm` for every argument and :func:`autosgm_from_config` for the reference's tuple
    configuration.

    References:
      Somefun, "AutoSGM: A Unified Lowpass Regularization Framework for Accelerated Learning", ICASSP 2024.
    """
    return scale_by_autosgm(
        learning_rate, beta_n, beta_a, beta_i, gamma_i, eta_i, weight_decay, eps,
        aoptlr=aoptlr, num_lrc=num_lrc, debias=debias, wd_level=wd_level, window=window, maximize=maximize,
        segments=segments,
    )


DEFAULT_LR_CFG = (True, 1e-2, 0)
DEFAULT_BETA_CFG = (0.9999, 0.999, 0.9, 0.0, 0.0, True)
DEFAULT_RC_CFG = (0, 0, 0, 2, 1, 1000, 1, 1, 0)
DEFAULT_WD_CFG = (0.0, 0)
DEFAULT_EPS_CFG = (1e-10,)


def validate_mix_cfg(mix_cfg: Any) -> tuple:
    """Check the reference's ``mix_cfg = (mix2d, flag, eps, beta, order)`` tuple (only ``mix2d = False`` runs).

    ``mix_cfg[0]``, ``mix_cfg[1]``: Python bools; ``mix_cfg[2]``: a finite real ``> 0``; ``mix_cfg[3]``: a real
    in ``[0, 1)``; ``mix_cfg[4]``: an integer ``>= 0``. TypeError/ValueError name ``mix_cfg[i]`` and its range;
    ``mix_cfg[0] = True`` (the reference's undocumented 2-D whitening path) raises NotImplementedError.
    """
    if isinstance(mix_cfg, (str, bytes)) or not hasattr(mix_cfg, "__iter__"):
        raise TypeError(f"Invalid mix_cfg: {mix_cfg!r}; expected a tuple (bool, bool, eps > 0, beta in [0, 1), "
                        "integer order >= 0).")
    mix = tuple(mix_cfg)
    if len(mix) != 5:
        raise ValueError(f"Invalid mix_cfg: {mix_cfg!r}; expected 5 elements, got {len(mix)}.")
    for i in (0, 1):
        if not isinstance(mix[i], (bool, np.bool_)):
            raise TypeError(f"Invalid mix_cfg[{i}]: {mix[i]!r}; expected a Python bool.")
    for i in (2, 3):
        if isinstance(mix[i], (bool, np.bool_)) or not isinstance(mix[i], (int, float, np.integer, np.floating)):
            raise TypeError(f"Invalid mix_cfg[{i}]: {mix[i]!r}; expected a real number.")
    if not (math.isfinite(float(mix[2])) and float(mix[2]) > 0.0):
        raise ValueError(f"Invalid mix_cfg[2]: {mix[2]!r}; allowed range is (0, inf).")
    if not 0.0 <= float(mix[3]) < 1.0:
        raise ValueError(f"Invalid mix_cfg[3]: {mix[3]!r}; allowed range is [0, 1).")
    if not _is_int(mix[4]) or int(mix[4]) < 0:
        raise ValueError(f"Invalid mix_cfg[4]: {mix[4]!r}; expected an integer >= 0.")
    if mix[0]:
        raise NotImplementedError("AutoSGM: mix_cfg[0]=True (the reference's undocumented 2-D whitening "
                                  "path) is not implemented.")
    return mix


def config_from_tuples(
    lr_cfg=DEFAULT_LR_CFG,
    beta_cfg=DEFAULT_BETA_CFG,
    rc_cfg=DEFAULT_RC_CFG,
    wd_cfg=DEFAULT_WD_CFG,
    eps_cfg=DEFAULT_EPS_CFG,
    maximize: bool = False,
) -> dict:
    """Keyword arguments of :func:`autosgm` from the reference's configuration tuples.

    ``lr_cfg = (aoptlr, learning_rate, num_lrc)``; ``beta_cfg = (beta_n, beta_a, beta_i, gamma_i, eta_i,
    debias)``; ``rc_cfg = (rcm, inseq, x, n, m, tau, spe, cfact, e)`` (→ ``window``, None when rcm = 0);
    ``wd_cfg = (weight_decay, wd_level)``; ``eps_cfg = (eps,)`` (extra entries are ignored with a warning).
    """
    lr_cfg, beta_cfg, rc_cfg, wd_cfg = tuple(lr_cfg), tuple(beta_cfg), tuple(rc_cfg), tuple(wd_cfg)
    eps_cfg = tuple(eps_cfg) if isinstance(eps_cfg, (tuple, list)) else (eps_cfg,)
    for name, cfg, size in (("lr_cfg", lr_cfg, 3), ("beta_cfg", beta_cfg, 6), ("rc_cfg", rc_cfg, 9),
                            ("wd_cfg", wd_cfg, 2)):
        if len(cfg) != size:
            raise ValueError(f"Invalid {name}: {cfg!r}; expected a tuple of {size} entries.")
    if len(eps_cfg) < 1:
        raise ValueError(f"Invalid eps_cfg: {eps_cfg!r}; expected (eps,).")
    if len(eps_cfg) > 1:
        warnings.warn(f"eps_cfg={eps_cfg!r}: only eps_cfg[0] is used; the extra entries are ignored.",
                      stacklevel=3)
    aoptlr, learning_rate, num_lrc = lr_cfg
    if isinstance(aoptlr, (bool, np.bool_)) or (_is_int(aoptlr) and aoptlr in (0, 1)):
        aoptlr = bool(aoptlr)
    else:
        hint = "; the Huberised step of lr_cfg[0] == 4 is num_lrc=4, i.e. lr_cfg=(True, lr, 4)" if aoptlr == 4 else ""
        raise ValueError(f"Invalid lr_cfg[0] (aoptlr): {aoptlr!r}; expected a bool{hint}.")
    beta_n, beta_a, beta_i, gamma_i, eta_i, debias = beta_cfg
    rcm, inseq, x, n, m, tau, spe, cfact, e = rc_cfg
    weight_decay, wd_level = wd_cfg
    window = None if rcm == 0 else autosgm_window(rcm, spe=spe, tau=tau, inseq=inseq, x=x, n=n, m=m,
                                                  cfact=cfact, e=e)
    if isinstance(debias, (bool, np.bool_)) or (_is_int(debias) and debias in (0, 1)):
        debias = bool(debias)  # the reference writes 0/1 too; anything else (a string: bool("no") is True) raises
    else:
        raise C.HyperparameterTypeError(f"Invalid beta_cfg[5] (debias): {debias!r}; expected a bool (or 0/1).")
    # integer options stay as given unless they are integers (no truncation of 2.5): _validate names them
    num_lrc, wd_level = (int(v) if _is_int(v) else v for v in (num_lrc, wd_level))
    return dict(
        learning_rate=learning_rate, beta_n=beta_n, beta_a=beta_a, beta_i=beta_i, gamma_i=gamma_i, eta_i=eta_i,
        weight_decay=weight_decay, eps=eps_cfg[0], aoptlr=aoptlr, num_lrc=num_lrc, debias=debias,
        wd_level=wd_level, window=window, maximize=maximize,
    )


def autosgm_from_config(
    lr_cfg=DEFAULT_LR_CFG,
    beta_cfg=DEFAULT_BETA_CFG,
    rc_cfg=DEFAULT_RC_CFG,
    wd_cfg=DEFAULT_WD_CFG,
    eps_cfg=DEFAULT_EPS_CFG,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """:func:`autosgm` from the reference's tuples (paste a configuration from its README).

    Example (the README's "opt7"-like configuration, one 10k-step cosine window)::

        autosgm_from_config(lr_cfg=(True, 1e-2, 3), beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True),
                            rc_cfg=(1, 0, 0, 2, 1, 1, 10_000, 1, 0), wd_cfg=(0.0, 1), eps_cfg=(1e-10,))
    """
    return autosgm(**config_from_tuples(lr_cfg, beta_cfg, rc_cfg, wd_cfg, eps_cfg, maximize))
