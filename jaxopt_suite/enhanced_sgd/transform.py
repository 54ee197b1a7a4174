r"""EnhancedSGD: SGD with momentum whose learning rate and momentum are steered by a Q-learning controller.

One step (N gradient elements over all leaves; ``D`` is float64 with x64 enabled, else float32):

.. code-block:: text

    skip the step (zero update, state unchanged except `skipped`) if any gradient or the loss is not finite
    (with lookahead, the slow weights and the lookahead counter are unchanged too: no synchronisation)
    v   = Σ (g − mean g)² / (N − 1)                             (all leaves together; 0 if N = 1;
                                                                 saturated at ¼ of the leaf dtype's maximum)
    gv  = sf·v + (1 − sf)·gv                                    (smoothed variance)
    gv  = 0.9·gv_prev + 0.1·gv   if |gv − gv_prev| > 0.9        (stabiliser; gv_prev from the last valued step)
    c   = min(max(2·√gv, 0.5), 10)                              (clip level)
    H   = normalised entropy of the histogram of g (entropy.py); H̄ its running mean (0.9/0.1)
    with a loss f (``value=``): loss window, spike test f − f̄ > 0.5|f̄|, Q-learning step (qlearning.py)
    k   = spike level (1 at a spike, falling by 1/spike_recovery_steps per valued step)
    lr_t  = lr · lr_scale · (1 − (1 − lcf)·k)
    mom_t = min(μ · momentum_scale · (1 − 0.1·k), max_momentum)
    per leaf:  g ← centre(g);  g ← clip(g, −c, c) if gv > 0;  g ← g + σ_n·ξ,  ξ ~ N(0, 1)
               ĝ = (1 − w)·g + w·R / (1 − ρ^n_R)                (retention blend, once R holds a gradient)
               b ← mom_t·b + ĝ;   update = −lr_t·b
    if H ≥ H̄:  R ← ρ·R + (1 − ρ)·g,  n_R += 1                  (ρ = 1 − 1/gradient_buffer_size)

The scales live in bounded intervals and are never compounded into the learning rate, so
``lr_t ∈ [lcf·lo·lr, hi·lr]`` and ``mom_t ≤ max_momentum`` at every step.

The blend and the insert are evaluated as ``ĝ = g + w·(R/(1 − ρ^n_R) − g)`` and ``R ← R + (1 − ρ)·(g − R)``
(the same quantities; one product per addition, so that XLA's FMA contraction rounds them alike in every
compiled program).

Layouts: the pytree layout (default) and the torch bridge's flat layout (``segments=FlatLayout``) run the same
segment operations over flat buffers (:mod:`.flat`; the pytree layout packs its leaves into one buffer per
dtype), so they give bit-identical results, and the compiled step does not grow with the number of tensors.
Under a mesh with explicit axes the pytree layout runs per leaf instead (packing sharded leaves would need
collectives); that path agrees with the others to rounding (per-tensor sums reduced in XLA's order).

References:
  Watkins & Dayan, "Q-learning", Machine Learning 8 (1992).
  Yong et al., "Gradient Centralization", arXiv:2004.01461 (``gradient_centering=True``).
  Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", arXiv:1907.08610.
  Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks", arXiv:1511.06807.
  The EnhancedSGD PyTorch optimizer (github.com/waefrebeorn/EnhancedSGD, commit 75e9fad), whose README
  features this implements; its gradient path without a loss is reproduced exactly (see the tests).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _common as C
from ..nonfinite import nonfinite_option
from . import entropy as E
from . import flat as F
from . import qlearning as Q

PyTree = Any

LOSS_WINDOW = 100
STABILIZER = 0.9
SPIKE_RATIO = 0.5
SPIKE_MOMENTUM_CUT = 0.1
ENTROPY_MEAN_DECAY = 0.9
CLIP_MIN, CLIP_MAX = 0.5, 10.0


class EnhancedSGDState(NamedTuple):
    """State of :func:`scale_by_enhanced_sgd` (``D``: float64 with x64 enabled, else float32).

    Attributes:
      count: int32 number of steps taken (skipped steps excluded).
      key: PRNG key (raw uint32 key data) for the noise and the controller's exploration.
      momentum_buffer: momentum ``b``, shaped like the params.
      retained: retained-gradient average ``R`` (``None`` without ``gradient_retention``).
      retained_count: int32 number of gradients folded into ``R``.
      grad_var: smoothed gradient variance ``gv`` (D).
      prev_grad_var: ``gv`` at the last step that had a loss (D, 0 before any).
      entropy_mean: running mean ``H̄`` of the normalised entropy (D).
      loss_history: ring buffer of the last ``100`` losses (D[100]); loss_count: int32 losses seen.
      spike_level: ``k ∈ [0, 1]`` (D).
      lr_scale, momentum_scale: the controller's scales (D, within their bounds).
      q_table: D[27, 18] action values.
      epsilon: exploration rate; mix_prob: probability of a multiplicative exploratory action;
      initial_mix_prob: its ceiling; mix_prev_loss: last loss seen by :func:`update_mix_prob` (NaN before).
      prev_state, prev_action: int32 last transition's state and action; has_prev: bool.
      prev_loss, prev_entropy: loss and normalised entropy of the last valued step (D).
      last_lr, last_momentum, last_entropy: diagnostics of the last step (D; ``last_lr`` of the first leaf
        when the learning rate is given per leaf); last_spike: bool; skipped: int32 non-finite steps skipped.
    """

    count: Any
    key: Any
    momentum_buffer: Any
    retained: Any
    retained_count: Any
    grad_var: Any
    prev_grad_var: Any
    entropy_mean: Any
    loss_history: Any
    loss_count: Any
    spike_level: Any
    lr_scale: Any
    momentum_scale: Any
    q_table: Any
    epsilon: Any
    mix_prob: Any
    initial_mix_prob: Any
    mix_prev_loss: Any
    prev_state: Any
    prev_action: Any
    has_prev: Any
    prev_loss: Any
    prev_entropy: Any
    last_lr: Any
    last_momentum: Any
    last_entropy: Any
    last_spike: Any
    skipped: Any


# --------------------------------------------------------------------------------------------------
# Gaussian noise from counter-based random bits
# --------------------------------------------------------------------------------------------------


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer finaliser (xor-shift-multiply; constants from Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _zeros_like(x: jax.Array) -> jax.Array:
    """Zeros shaped, typed and (under an explicit mesh) sharded like ``x``."""
    if E.explicit_spec(x) is None:
        return jnp.zeros_like(x)
    return jax.lax.full_like(x, 0, sharding=jax.typeof(x).sharding)


def _first_element(x: jax.Array) -> Optional[jax.Array]:
    """``x``'s first element, a scalar that exists only once ``x`` is computed (an order token for
    :func:`~jaxopt_suite._common.ordered_after`); ``None`` where none is taken.

    Under a mesh with explicit axes reading one element of a sharded array needs a declared collective;
    there the order is left to XLA (which may copy).
    """
    if x.size == 0 or E.explicit_spec() is not None:
        return None
    return x[(0,) * x.ndim]


def _flat_index(shape: Sequence[int], like: Optional[jax.Array]) -> jax.Array:
    """uint32 row-major element index of an array of ``shape`` (sharded like ``like`` under an explicit mesh)."""
    spec = None if like is None else E.explicit_spec(like)
    extra = {} if spec is None else {"out_sharding": spec}
    index = jnp.zeros(tuple(shape), jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, tuple(shape), dim, **extra) * jnp.uint32(stride)
        stride *= shape[dim]
    return index


def gaussian_noise(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32, *,
                   like: Optional[jax.Array] = None) -> jax.Array:
    """Standard normal samples from a raw uint32 key, cheaper than ``jax.random.normal`` on CPU.

    Element ``i`` gets ``h = mix(mix(i + k0) ^ k1)`` (two rounds of a bijective 32-bit hash keyed by the
    two key words) and ``ξ = normal_from_bits(h)`` (see there; always finite, |ξ| ≤ 5.42). Computed in
    float32 and cast to ``dtype``. The key must be a legacy raw key (``uint32[2]``). ``like``: an array whose
    sharding the samples follow (the values do not depend on the sharding).
    """
    key = jnp.asarray(key)
    index = _flat_index(tuple(shape), like) if shape else jnp.zeros((), jnp.uint32)
    bits = _mix32(_mix32(index + key[0]) ^ key[1])
    return normal_from_bits(bits).astype(dtype)


def normal_from_bits(bits: jax.Array) -> jax.Array:
    """float32 standard normal from uint32 random bits, through a uniform strictly inside (−1, 1).

    With ``m = h >> 8 ∈ [0, 2²⁴)``: ``u = (2m + 1 − 2²⁴)·2⁻²⁴``, the midpoints of a 2²⁴-point grid on
    (−1, 1), and ``ξ = √2·erfinv(u)``, the exact inverse normal CDF of that uniform. The odd integer
    ``2m + 1 − 2²⁴`` has magnitude below 2²⁴, so it and its scaling by 2⁻²⁴ are exact in float32: |u| ≤ 1 − 2⁻²⁴
    and |ξ| ≤ 5.42. (Forming ``m + ½`` in float32 instead rounds ``2²⁴ − ½`` up to 2²⁴, giving u = 1 and
    ξ = +inf for one bit pattern in 2²⁴ — noise that would poison the parameters after the finiteness check.)
    """
    m = (jnp.asarray(bits, jnp.uint32) >> 8).astype(jnp.int32)
    u = (2 * m + (1 - 2**24)).astype(jnp.float32) * np.float32(2.0**-24)
    return np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(u)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _integer_scalar_array(value: Any) -> bool:
    """A 0-d integer array (NumPy, JAX or a tracer): a seed that init turns into the PRNG key."""
    return (isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0
            and jnp.issubdtype(value.dtype, jnp.integer))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {minimum}.")


def _check_bounds(name: str, bounds: Any) -> tuple[float, float]:
    """``(lo, hi)`` as floats: a pair of real numbers (not bools or strings), finite, ``0 < lo <= 1 <= hi``."""
    expect = "expected a pair (lo, hi) of real numbers with 0 < lo <= 1 <= hi"
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__iter__"):
        raise TypeError(f"Invalid {name}: {bounds!r}; {expect}.")
    items = list(bounds)
    if len(items) != 2:
        raise ValueError(f"Invalid {name}: {bounds!r}; {expect} (got {len(items)} elements).")
    for i, b in enumerate(items):
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, float, np.integer, np.floating)):
            raise TypeError(f"Invalid {name}[{i}]: {b!r}; {expect}.")
    lo, hi = (float(b) for b in items)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= 1 <= hi):
        raise ValueError(f"Invalid {name}: {bounds!r}; {expect}.")
    return lo, hi


def _validate(
    learning_rate, momentum, smoothing_factor, noise_scale, entropy_weight, loss_correction_factor,
    retention_weight, q_learning_rate, q_discount, q_epsilon, q_epsilon_decay, q_epsilon_min,
    q_initial_mix_prob, gradient_centering, centering_axis, gradient_buffer_size, lr_scale_bounds,
    momentum_scale_bounds, max_momentum, spike_recovery_steps, entropy_bins, bayesian_prior_std, seed,
    flags,
):
    for name, value in (("learning_rate", learning_rate), ("momentum", momentum)):
        if not callable(value) and any(callable(leaf) for leaf in jax.tree.leaves(value)):
            raise ValueError(f"Invalid {name}: {value!r}; per-leaf values must be numbers (a learning-rate "
                             "schedule is one callable for every leaf).")
    is_none = lambda x: x is None  # noqa: E731 - a None (per-leaf) value is a leaf, so it raises
    for leaf in jax.tree.leaves(learning_rate, is_leaf=is_none):
        C.check_range("learning_rate", leaf, gt=0.0)
    for leaf in jax.tree.leaves(momentum, is_leaf=is_none):
        C.check_range("momentum", leaf, ge=0.0, lt=1.0)
    C.check_range("smoothing_factor", smoothing_factor, gt=0.0, le=1.0)
    C.check_range("noise_scale", noise_scale, ge=0.0)
    C.check_range("entropy_weight", entropy_weight, ge=0.0)
    C.check_range("loss_correction_factor", loss_correction_factor, gt=0.0, le=1.0)
    C.check_range("retention_weight", retention_weight, ge=0.0, le=1.0)
    for name, value in (("q_learning_rate", q_learning_rate), ("q_discount", q_discount),
                        ("q_epsilon", q_epsilon), ("q_epsilon_min", q_epsilon_min),
                        ("q_initial_mix_prob", q_initial_mix_prob)):
        C.check_range(name, value, ge=0.0, le=1.0)
    C.check_range("q_epsilon_decay", q_epsilon_decay, gt=0.0, le=1.0)
    for name, value in flags.items():
        C.static_bool(name, value)
    C.check_choice("gradient_centering", gradient_centering, (False, True, "all"))
    if isinstance(centering_axis, bool) or not isinstance(centering_axis, (int, np.integer)):
        raise ValueError(f"Invalid centering_axis: {centering_axis!r}; expected an integer axis (0 or -1).")
    _check_int("gradient_buffer_size", gradient_buffer_size, 1)
    _check_int("spike_recovery_steps", spike_recovery_steps, 1)
    _check_int("entropy_bins", entropy_bins, 2)
    lr_bounds = _check_bounds("lr_scale_bounds", lr_scale_bounds)
    momentum_bounds = _check_bounds("momentum_scale_bounds", momentum_scale_bounds)
    if isinstance(max_momentum, bool) or not isinstance(max_momentum, (int, float, np.floating)) \
            or not 0 < max_momentum < 1:
        raise ValueError(f"Invalid max_momentum: {max_momentum!r}; allowed range is (0, 1).")
    if isinstance(bayesian_prior_std, bool) or not isinstance(bayesian_prior_std, (int, float, np.floating)) \
            or not 0 <= bayesian_prior_std < math.inf:
        raise ValueError(f"Invalid bayesian_prior_std: {bayesian_prior_std!r}; allowed range is [0, inf).")
    if isinstance(seed, bool) or not (isinstance(seed, (int, np.integer)) or _integer_scalar_array(seed)):
        raise ValueError(f"Invalid seed: {seed!r}; expected a Python integer (or a 0-d integer array, which may "
                         "be traced: the seed is read by init only).")
    return lr_bounds, momentum_bounds


# --------------------------------------------------------------------------------------------------
# pieces of the step
# --------------------------------------------------------------------------------------------------


def _work_dtype(dtype: Any) -> Any:
    """Arithmetic dtype of a leaf: at least float32 (half-precision leaves are rounded once, at the end)."""
    return jnp.promote_types(dtype, jnp.float32)


VARIANCE_SCALE_FROM = 2.0**32
VARIANCE_CEILING = 0.25  # of the largest finite value of the gradients' dtype


def _variance_scale(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, 1/s)`` (float32) for the variance pass: ``s = 1`` while ``max(|lo|, |hi|) < 2³²``, else the power of
    two ``2^⌊log₂ max|g|⌋`` (its exponent bits, at most 2¹²⁶). Both are exact powers of two; ``1`` for
    non-finite ranges (such a step is skipped anyway)."""
    top = jnp.maximum(jnp.abs(lo), jnp.abs(hi)).astype(jnp.float32)
    # the exponent field of max|g| (at most 2^126, so that 2^-k stays a normal number)
    bits = jnp.minimum(jax.lax.bitcast_convert_type(top, jnp.int32) & jnp.int32(0x7F800000), jnp.int32(253 << 23))
    power = jax.lax.bitcast_convert_type(bits, jnp.float32)
    big = (top >= VARIANCE_SCALE_FROM) & jnp.isfinite(top)
    scale = jnp.where(big, power, jnp.float32(1.0))
    inverse_bits = jnp.int32(254 << 23) - bits  # 2^-k for 2^k: exponent field 254 − (127 + k) + 127
    inverse = jnp.where(big, jax.lax.bitcast_convert_type(inverse_bits, jnp.float32), jnp.float32(1.0))
    return scale, inverse


def _per_leaf(value: Any, treedef: Any) -> list:
    """``value`` once per leaf: a scalar is repeated, a pytree matching the params is flattened."""
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
        return [value] * treedef.num_leaves
    return treedef.flatten_up_to(value)


def _slice_centred(g: jax.Array, mode: Any) -> bool:
    """Whether leaf ``g`` is centred per output slice (``gradient_centering=True``, ``ndim ≥ 2``)."""
    return mode is True and g.ndim >= 2


def _centre(g: jax.Array, mode: Any, axis: int, leaf_sum: jax.Array,
            slice_sums: Optional[jax.Array]) -> jax.Array:
    """Gradient centering: ``True`` per output slice (ndim ≥ 2), ``'all'`` whole tensor (size > 1).

    ``leaf_sum`` and ``slice_sums`` (the sums of the slices along ``axis``; ``None`` for leaves not
    centred per slice) come from :func:`entropy.leaf_summary`.
    """
    if _slice_centred(g, mode):
        keep = axis % g.ndim
        shape = [1] * g.ndim
        shape[keep] = g.shape[keep]
        return g - (slice_sums.astype(g.dtype) / (g.size // g.shape[keep])).reshape(shape)
    if mode == "all" and g.size > 1:
        return g - (leaf_sum / g.size).astype(g.dtype)
    return g


def _map_enhanced_states(state: PyTree, fn) -> PyTree:
    """Apply ``fn`` to every :class:`EnhancedSGDState` inside ``state`` (chains, lookahead, inject...)."""
    is_esgd = lambda x: isinstance(x, EnhancedSGDState)  # noqa: E731
    return jax.tree.map(lambda x: fn(x) if is_esgd(x) else x, state, is_leaf=is_esgd)


def find_enhanced_state(state: PyTree) -> EnhancedSGDState:
    """The (first) :class:`EnhancedSGDState` inside an optimizer state; ``ValueError`` if there is none."""
    is_esgd = lambda x: isinstance(x, EnhancedSGDState)  # noqa: E731
    found = [x for x in jax.tree.leaves(state, is_leaf=is_esgd) if is_esgd(x)]
    if not found:
        raise ValueError("The state contains no EnhancedSGDState.")
    return found[0]


def update_mix_prob(state: PyTree, loss: Any, *, decay_factor: float = 0.98, loss_threshold: float = 0.01):
    """Adapt the probability of multiplicative exploratory actions to the loss change (user-invoked).

    The first call stores ``loss``. Afterwards, with ``Δ = |prev − loss|``::

        mix_prob ← max(0.1, mix_prob · decay_factor)                          if Δ < loss_threshold
        mix_prob ← min(initial_mix_prob, mix_prob · (1 + 0.05·decay_factor))  otherwise

    Accepts an :class:`EnhancedSGDState` or any optimizer state containing one; returns the new state.
    """

    def one(s: EnhancedSGDState) -> EnhancedSGDState:
        dtype = s.mix_prob.dtype
        f = jnp.asarray(loss).astype(dtype)
        first = jnp.isnan(s.mix_prev_loss)
        change = jnp.abs(s.mix_prev_loss - f)
        lowered = jnp.maximum(jnp.asarray(0.1, dtype), s.mix_prob * decay_factor)
        raised = jnp.minimum(s.initial_mix_prob, s.mix_prob * (1 + 0.05 * decay_factor))
        mix = jnp.where(first, s.mix_prob, jnp.where(change < loss_threshold, lowered, raised))
        return s._replace(mix_prob=mix.astype(dtype), mix_prev_loss=f)

    return _map_enhanced_states(state, one)


def bayesian_initialize(
    state: PyTree,
    key: Optional[jax.Array] = None,
    prior_std: float = 0.05,
    *,
    lr_scale_bounds: Sequence[float] = (0.5, 1.5),
    momentum_scale_bounds: Sequence[float] = (0.9, 1.1),
    adaptive_momentum: bool = True,
):
    """Redraw the controller's scales from a Gaussian prior around their current values.

    ``lr_scale ← clip(lr_scale + σ z1, lr_scale_bounds)``, ``momentum_scale ← clip(momentum_scale + σ z2,
    momentum_scale_bounds)`` (unchanged without ``adaptive_momentum``), ``(z1, z2) ~ N(0, 1)`` from ``key``,
    or, when ``key`` is None, from a split of the state's own key (which then advances). Model weights are
    never touched. Accepts an :class:`EnhancedSGDState` or any optimizer state containing one.
    """
    lr_bounds = _check_bounds("lr_scale_bounds", lr_scale_bounds)
    momentum_bounds = _check_bounds("momentum_scale_bounds", momentum_scale_bounds)

    def one(s: EnhancedSGDState) -> EnhancedSGDState:
        if key is None:
            new_key, draw_key = jax.random.split(s.key)
        else:
            new_key, draw_key = s.key, key
        z = jax.random.normal(draw_key, (2,), s.lr_scale.dtype)
        lr_scale = jnp.clip(s.lr_scale + prior_std * z[0], *lr_bounds).astype(s.lr_scale.dtype)
        momentum_scale = s.momentum_scale
        if adaptive_momentum:
            momentum_scale = jnp.clip(s.momentum_scale + prior_std * z[1], *momentum_bounds)
            momentum_scale = momentum_scale.astype(s.momentum_scale.dtype)
        return s._replace(key=new_key, lr_scale=lr_scale, momentum_scale=momentum_scale)

    return _map_enhanced_states(state, one)


# --------------------------------------------------------------------------------------------------
# the transformation
# --------------------------------------------------------------------------------------------------


@C.declare_static(
    "apply_noise", "adaptive_momentum", "gradient_centering", "centering_axis", "gradient_clipping",
    "gradient_retention", "gradient_buffer_size", "lr_scale_bounds", "momentum_scale_bounds", "max_momentum",
    "spike_recovery_steps", "entropy_bins", "bayesian_init", "bayesian_prior_std", "segments",
    init_only=("q_epsilon", "q_initial_mix_prob", "seed"),
)
def scale_by_enhanced_sgd(
    learning_rate: Any = 0.01,
    momentum: Any = 0.9,
    smoothing_factor: Any = 0.1,
    noise_scale: Any = 1e-4,
    entropy_weight: Any = 0.1,
    loss_correction_factor: Any = 0.5,
    retention_weight: Any = 0.1,
    q_learning_rate: Any = 0.1,
    q_discount: Any = 0.9,
    q_epsilon: Any = 0.5,
    q_epsilon_decay: Any = 0.995,
    q_epsilon_min: Any = 0.01,
    q_initial_mix_prob: Any = 0.8,
    *,
    apply_noise: bool = True,
    adaptive_momentum: bool = True,
    gradient_centering: Any = True,
    centering_axis: int = 0,
    gradient_clipping: bool = True,
    gradient_retention: bool = True,
    gradient_buffer_size: int = 100,
    lr_scale_bounds: Sequence[float] = (0.5, 1.5),
    momentum_scale_bounds: Sequence[float] = (0.9, 1.1),
    max_momentum: float = 0.99,
    spike_recovery_steps: int = 10,
    entropy_bins: int = 100,
    bayesian_init: bool = False,
    bayesian_prior_std: float = 0.05,
    seed: int = 0,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""EnhancedSGD's full step (without lookahead): returns the parameter updates ``−lr_t·b``.

    See the module docstring for the update rule. Pass the loss as ``value=`` to run the Q-learning
    controller and the spike handling; without it (decided at trace time) both are skipped and the scales
    keep their stored values.

    Args:
      learning_rate: base learning rate ``lr > 0``; a scalar or a pytree of scalars matching the params, or an
        optax schedule ``count -> lr``. The controller only scales this base value (``lr_t = lr·scale·…``),
        so a scheduled base means what a torch scheduler on the bridge's ``lr`` means. The schedule is
        evaluated at the number of previous ``update`` calls (0 at the first, skipped non-finite steps
        included; one global count, as ``optax.inject_hyperparams`` counts); a constant schedule gives the
        constant's results exactly.
      momentum: base momentum ``μ ∈ [0, 1)``; a scalar or a pytree of scalars matching the params.
      smoothing_factor: ``sf ∈ (0, 1]``, weight of the new variance in ``gv``.
      noise_scale: ``σ_n ≥ 0``, standard deviation of the Gaussian gradient noise.
      entropy_weight: ``w_H ≥ 0``, weight of the instability penalty in the controller's reward.
      loss_correction_factor: ``lcf ∈ (0, 1]``, learning-rate factor at a loss spike.
      retention_weight: ``w ∈ [0, 1]``, weight of the retained gradient in the blend.
      q_learning_rate: α of the Q-update (in [0, 1]).
      q_discount: γ of the Q-update (in [0, 1]).
      q_epsilon: initial exploration rate (read by ``init`` only).
      q_epsilon_decay: per-valued-step decay of the exploration rate (in (0, 1]).
      q_epsilon_min: floor of the exploration rate.
      q_initial_mix_prob: initial (and maximum) probability of multiplicative exploratory actions (read by
        ``init`` only).
      apply_noise: add ``σ_n·ξ`` to the processed gradient.
      adaptive_momentum: let the controller scale the momentum.
      gradient_centering: ``False``; ``True`` (Gradient Centralization: leaves with ndim ≥ 2 lose their mean
        over all axes but ``centering_axis``); ``'all'`` (every leaf with more than one element loses its
        whole-tensor mean).
      centering_axis: the output axis kept by ``True`` (0 for PyTorch ``(out, in, …)``, −1 for flax kernels).
      gradient_clipping: clip elements to ``±c`` once ``gv > 0``.
      gradient_retention: keep the retained average ``R`` and blend it in.
      gradient_buffer_size: ``≥ 1``; ``R`` averages about this many retained gradients (ρ = 1 − 1/size).
      lr_scale_bounds: ``(lo, hi)`` of the learning-rate scale, ``0 < lo ≤ 1 ≤ hi``.
      momentum_scale_bounds: ``(lo, hi)`` of the momentum scale, ``0 < lo ≤ 1 ≤ hi``.
      max_momentum: cap of the effective momentum, in (0, 1).
      spike_recovery_steps: valued steps over which a spike's cut fades linearly (≥ 1).
      entropy_bins: histogram bins (≥ 2).
      bayesian_init: draw the initial scales from ``N(1, bayesian_prior_std²)`` (clipped to their bounds).
      bayesian_prior_std: standard deviation of that prior.
      seed: seed of the PRNG key kept in the state: a Python integer, or a 0-d integer array (e.g. traced, so
        that one compiled ``init`` serves every seed). Read by ``init`` only; ``update`` does not depend on
        it (it advances the key in the state).
      segments: ``None`` (pytree layout) or a :class:`~jaxopt_suite._common.FlatLayout` (the torch bridge's flat
        layout): the params and gradients are then one flat buffer (a one-leaf pytree of ``layout.total``
        elements) holding the tensors as segments, ``grad_mask`` is one bool per segment (dead entry last),
        and ``learning_rate`` / ``momentum`` are one value or a sequence of one per tensor. Both layouts run
        the same segment operations (:mod:`.flat`): the results are bit-identical to the pytree layout's on
        the same tensors (for layouts whose offsets are multiples of 8, as the bridge's are).

    Extra args: ``value`` (the loss, optional), ``grad_mask`` (per-leaf bools; False leaves get a zero
    update, keep their buffers and are left out of the statistics). Others are ignored.
    """
    if callable(learning_rate):  # a schedule: the block is rebuilt at each update around its value
        others = {k: v for k, v in locals().items() if k != "learning_rate"}  # the other arguments, unchanged
        return C.with_schedule(lambda lr: scale_by_enhanced_sgd(lr, **others), learning_rate)
    flags = dict(apply_noise=apply_noise, adaptive_momentum=adaptive_momentum,
                 gradient_clipping=gradient_clipping, gradient_retention=gradient_retention,
                 bayesian_init=bayesian_init)
    lr_bounds, momentum_bounds = _validate(
        learning_rate, momentum, smoothing_factor, noise_scale, entropy_weight, loss_correction_factor,
        retention_weight, q_learning_rate, q_discount, q_epsilon, q_epsilon_decay, q_epsilon_min,
        q_initial_mix_prob, gradient_centering, centering_axis, gradient_buffer_size, lr_scale_bounds,
        momentum_scale_bounds, max_momentum, spike_recovery_steps, entropy_bins, bayesian_prior_std, seed,
        flags,
    )
    if segments is not None:
        if not isinstance(segments, C.FlatLayout):
            raise ValueError(f"Invalid segments: {segments!r}; expected None or a jaxopt_suite FlatLayout.")
        if gradient_centering is True and len(segments.shapes) != segments.num_tensors:
            raise ValueError("Invalid segments: gradient_centering=True centres tensors of ndim >= 2 per output "
                             "slice, so the FlatLayout needs the tensors' shapes (FlatLayout.from_shapes).")
    rho = 1.0 - 1.0 / gradient_buffer_size
    max_momentum = float(max_momentum)

    def init_fn(params):
        D = E.controller_dtype()
        # every field gets its own buffer, so that the state can be donated
        zero = lambda: jnp.zeros((), D)  # noqa: E731
        lr_scale = jnp.ones((), D)
        momentum_scale = jnp.ones((), D)
        if bayesian_init:
            z = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 1), (2,), D)
            lr_scale = jnp.clip(1 + bayesian_prior_std * z[0], *lr_bounds).astype(D)
            if adaptive_momentum:
                momentum_scale = jnp.clip(1 + bayesian_prior_std * z[1], *momentum_bounds).astype(D)
        mix = jnp.asarray(q_initial_mix_prob).astype(D)
        return EnhancedSGDState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(seed),
            momentum_buffer=jax.tree.map(jnp.zeros_like, params),
            retained=jax.tree.map(jnp.zeros_like, params) if gradient_retention else None,
            retained_count=jnp.zeros((), jnp.int32),
            grad_var=zero(), prev_grad_var=zero(), entropy_mean=zero(),
            loss_history=jnp.zeros((LOSS_WINDOW,), D), loss_count=jnp.zeros((), jnp.int32),
            spike_level=zero(), lr_scale=lr_scale, momentum_scale=momentum_scale,
            q_table=jnp.zeros((Q.NUM_STATES, Q.NUM_ACTIONS), D),
            epsilon=jnp.asarray(q_epsilon).astype(D), mix_prob=mix, initial_mix_prob=jnp.array(mix, copy=True),
            mix_prev_loss=jnp.full((), jnp.nan, D),
            prev_state=jnp.zeros((), jnp.int32), prev_action=jnp.zeros((), jnp.int32),
            has_prev=jnp.zeros((), bool), prev_loss=zero(), prev_entropy=zero(),
            last_lr=zero(), last_momentum=zero(), last_entropy=zero(),
            last_spike=jnp.zeros((), bool), skipped=jnp.zeros((), jnp.int32),
        )

    def controller(state: EnhancedSGDState, f, gv, hn, hbar, k_ctrl):
        """Loss window, spike level and one Q-learning step (§ valued steps). Returns updated fields."""
        D = state.grad_var.dtype
        seen = jnp.minimum(state.loss_count, LOSS_WINDOW)
        prev_mean = jnp.sum(state.loss_history) / jnp.maximum(seen, 1).astype(D)
        history = state.loss_history.at[state.loss_count % LOSS_WINDOW].set(f)
        mean = jnp.sum(history) / jnp.minimum(state.loss_count + 1, LOSS_WINDOW).astype(D)
        spike = (f - mean) > SPIKE_RATIO * jnp.abs(mean)
        spike_level = jnp.where(spike, 1.0, jnp.maximum(0.0, state.spike_level - 1.0 / spike_recovery_steps))

        s = Q.discretize(f, prev_mean, state.loss_count > 0, gv, state.prev_grad_var, hn, hbar)
        reward = Q.transition_reward(state.prev_loss, f, state.prev_entropy, hn, state.prev_grad_var, gv,
                                     jnp.asarray(entropy_weight, D))
        learned = Q.q_learning_update(state.q_table, state.prev_state, state.prev_action, reward, s,
                                      q_learning_rate, q_discount)
        q_table = jnp.where(state.has_prev, learned, state.q_table)
        action = Q.epsilon_greedy(k_ctrl, q_table[s], state.epsilon, state.mix_prob)
        lr_scale, momentum_scale = Q.apply_action(action, state.lr_scale, state.momentum_scale, lr_bounds,
                                                  momentum_bounds, adaptive_momentum=adaptive_momentum)
        return dict(
            loss_history=history, loss_count=C.safe_increment(state.loss_count),
            spike_level=spike_level.astype(D), last_spike=spike, q_table=q_table,
            epsilon=Q.decay_epsilon(state.epsilon, q_epsilon_decay, q_epsilon_min),
            lr_scale=lr_scale, momentum_scale=momentum_scale,
            prev_state=s, prev_action=action, has_prev=jnp.ones((), bool), prev_loss=f, prev_entropy=hn,
            prev_grad_var=gv,
        )

    def statistics_step(state: EnhancedSGDState, var, rounding, counts, total, lo, hi, f, k_ctrl):
        """The step's global statistics, the same in both layouts: the raw variance saturated and smoothed into
        ``gv``, the clip level, the entropy ``hn`` of the histogram ``counts`` and its running mean ``hbar``,
        the controller's fields (with a loss ``f``), and the lr / momentum factors they give."""
        D = state.grad_var.dtype
        var = jnp.minimum(var, VARIANCE_CEILING * jnp.finfo(rounding).max).astype(rounding).astype(D)
        sf = jnp.asarray(smoothing_factor).astype(D)
        gv = sf * var + (1 - sf) * state.grad_var
        gv = jnp.where(jnp.abs(gv - state.prev_grad_var) > STABILIZER,
                       state.prev_grad_var * STABILIZER + (1.0 - STABILIZER) * gv, gv)
        clip = jnp.minimum(jnp.maximum(2 * jnp.sqrt(gv), CLIP_MIN), CLIP_MAX)

        _, hn = E.entropy_from_counts(counts, total, D)
        hn = jnp.where(hi > lo, hn, 0).astype(D)
        hbar = jnp.where(state.count == 0, hn, state.entropy_mean)

        fields = dict(grad_var=gv, entropy_mean=(ENTROPY_MEAN_DECAY * hbar + (1 - ENTROPY_MEAN_DECAY) * hn).astype(D))
        if f is not None:
            fields.update(controller(state, f, gv, hn, hbar, k_ctrl))
        spike_level = fields.get("spike_level", state.spike_level)
        lr_scale = fields.get("lr_scale", state.lr_scale)
        momentum_scale = fields.get("momentum_scale", state.momentum_scale) if adaptive_momentum \
            else jnp.ones((), D)
        lcf = jnp.asarray(loss_correction_factor).astype(D)
        lr_factor = lr_scale * (1 - (1 - lcf) * spike_level)
        mom_factor = momentum_scale * (1 - SPIKE_MOMENTUM_CUT * spike_level)
        return gv, clip, hn, hbar, fields, lr_factor, mom_factor

    def update_fn(updates, state, params=None, *, value=None, grad_mask=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        masks = [None] * len(leaves) if grad_mask is None else [
            None if m is None else jnp.asarray(m, bool) for m in treedef.flatten_up_to(grad_mask)]
        D = state.grad_var.dtype
        f = None if value is None else jnp.asarray(value).astype(D)

        # Pass 1 over the gradients: sums, finiteness and range (one variadic reduction per leaf).
        # Leaves centred per output slice get their slice sums from the same pass.
        summaries = [E.leaf_summary(g, centering_axis if _slice_centred(g, gradient_centering) else None)
                     for g in leaves]
        slice_sums = [s[4] for s in summaries]
        sums, finite = [], jnp.ones((), bool)
        count_n = jnp.zeros((), D)
        for g, m, (s, _, _, ok, _) in zip(leaves, masks, summaries):
            if m is not None:
                s = jnp.where(m, s, 0)
                ok = jnp.where(m, ok, True)
            sums.append(s)
            finite = finite & ok
            count_n = count_n + (g.size if m is None else jnp.where(m, g.size, 0).astype(D))
        if f is not None:
            finite = finite & jnp.isfinite(f)

        def step(state: EnhancedSGDState):
            # One split gives the next key, the controller's key and one noise key per leaf.
            keys = jax.random.split(state.key, 2 + len(leaves))
            key, k_ctrl, leaf_keys = keys[0], keys[1], keys[2:]
            # Statistics of the raw gradient.
            total = count_n
            grad_mean = sum(s.astype(D) for s in sums) / jnp.maximum(total, 1)
            lo, hi = E.value_range(leaves, masks, summaries)
            # The squares are taken of (g − μ)/s with s = 1, or a power of two near max|g| once that reaches
            # 2³² (where Σ(g − μ)² could pass float32's range: one 1e20 element squares to inf): dividing by a
            # power of two is exact, so a scaled sum times s² is the unscaled sum bit for bit wherever that
            # is finite. The variance is then saturated at a quarter of the largest finite value of the leaves'
            # dtype (the precision it is rounded to): the two averages forming gv below mix values up to that
            # ceiling and cannot round past the range, so gv, the clip level and the controller stay finite.
            scale, inv_scale = _variance_scale(lo, hi)
            squares = []
            for g, m in zip(leaves, masks):
                wd = _work_dtype(g.dtype)
                inv = inv_scale.astype(wd)
                sq = jnp.sum(jnp.square(g.astype(wd) * inv - grad_mean.astype(wd) * inv))
                squares.append(sq if m is None else jnp.where(m, sq, 0))
            var = sum(sq.astype(D) for sq in squares) / jnp.maximum(total - 1, 1)
            var = (var * scale.astype(D)) * scale.astype(D)
            var = jnp.where(total > 1, var, 0)
            rounding = jnp.result_type(*[g.dtype for g in leaves])
            counts = E.histogram_counts(leaves, entropy_bins, lo, hi, masks)
            gv, clip, hn, hbar, fields, lr_factor, mom_factor = statistics_step(
                state, var, rounding, counts, total, lo, hi, f, k_ctrl)

            insert = hn >= hbar
            n_ret = state.retained_count
            retained_in = treedef.flatten_up_to(state.retained) if gradient_retention else [None] * len(leaves)
            buffers_in = treedef.flatten_up_to(state.momentum_buffer)
            lrs = _per_leaf(learning_rate, treedef)
            moms = _per_leaf(momentum, treedef)
            if gradient_retention:
                w = jnp.asarray(retention_weight).astype(D)
                inverse_bc = 1 / C.bias_correction_from(1.0 / gradient_buffer_size, jnp.maximum(n_ret, 1), D)

            lr_first = mom_first = None
            per_leaf = []
            for i, (lr, mu) in enumerate(zip(lrs, moms)):
                lr_t = jnp.asarray(lr).astype(D) * lr_factor
                mom_t = jnp.minimum(jnp.asarray(mu).astype(D) * mom_factor, max_momentum)
                if i == 0:
                    lr_first, mom_first = lr_t, mom_t
                per_leaf.append((lr_t, mom_t))

            def processed(i):
                """Leaf ``i``'s gradient after centering, clipping and noise (steps a–c), in its work dtype."""
                g = leaves[i]
                wd = _work_dtype(g.dtype)
                x = _centre(g.astype(wd), gradient_centering, centering_axis, sums[i].astype(wd), slice_sums[i])
                if gradient_clipping:
                    c = clip.astype(wd)
                    x = jnp.where(gv > 0, jnp.clip(x, -c, c), x)
                if apply_noise:
                    x = x + jnp.asarray(noise_scale).astype(wd) * gaussian_noise(leaf_keys[i], g.shape, wd, like=g)
                return x

            def advance(bufs, rets):
                """Retention, momentum and update per leaf (steps d–e and 6); a skipped step keeps every buffer."""
                new_bufs, new_rets, outs = [], [], []
                for i, (g, m, b, r, (lr_t, mom_t)) in enumerate(zip(leaves, masks, bufs, rets, per_leaf)):
                    wd = _work_dtype(g.dtype)
                    if apply_noise and gradient_retention:
                        # Materialised once, as the output of a conditional: XLA:CPU would otherwise evaluate
                        # the noise's polynomial again in each of its two consumers (blend and insert).
                        x = jax.lax.cond(finite, lambda: processed(i), lambda: _zeros_like(g).astype(wd))
                    else:
                        x = processed(i)
                    processed_x = x
                    keep = finite if m is None else finite & m
                    if gradient_retention:
                        # the flat path's form of (1 − w)·x + w·R̂ (one product per add, see there)
                        blend = x + w.astype(wd) * (r.astype(wd) * inverse_bc.astype(wd) - x)
                        x = jnp.where(n_ret > 0, blend, x)
                    b_new = jnp.where(keep, (mom_t.astype(wd) * b.astype(wd) + x).astype(b.dtype), b)
                    if gradient_retention:
                        # The insert is ordered after the new momentum buffer (it depends on one element of
                        # it), so it runs after the blend has read the old average, which it then overwrites
                        # in place; without that order XLA copies the whole average first.
                        r_new = r.astype(wd) + (1.0 - rho) * (processed_x - r.astype(wd))  # ρ·R + (1 − ρ)·x
                        r_new = jnp.where(keep & insert, r_new.astype(r.dtype), r)
                        token = _first_element(b_new)
                        new_rets.append(r_new if token is None else C.ordered_after(token, r_new))
                    else:
                        new_rets.append(r)
                    u = (-lr_t.astype(wd) * b_new.astype(wd)).astype(g.dtype)
                    new_bufs.append(b_new)
                    outs.append(jnp.where(keep, u, jnp.zeros_like(u)))
                return new_bufs, new_rets, outs

            fields.update(
                count=C.safe_increment(state.count), key=key,
                retained_count=jnp.where(insert, C.safe_increment(n_ret), n_ret) if gradient_retention else n_ret,
                last_lr=lr_first.astype(D), last_momentum=mom_first.astype(D), last_entropy=hn,
            )
            if "last_spike" not in fields:
                fields["last_spike"] = jnp.zeros((), bool)
            new_state = state._replace(**fields)
            new_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, state)
            return advance(buffers_in, retained_in), new_state

        # Every field is selected (jnp.where) rather than branched on: a conditional copies the buffers it
        # passes through, and its outputs must be materialised.
        (new_buffers, new_retained, outs), stepped = step(state)
        skipped = state._replace(skipped=C.safe_increment(state.skipped))
        new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), stepped, skipped)
        new_state = new_state._replace(
            momentum_buffer=treedef.unflatten(new_buffers),
            retained=treedef.unflatten(new_retained) if gradient_retention else None)
        return treedef.unflatten(outs), new_state


    def flat_update_fn(updates, state, params=None, *, value=None, grad_mask=None, **extra_args):
        """The step over flat buffers (:mod:`.flat`): one kernel per operation whatever the number of
        tensors. The pytree layout packs its leaves into one buffer per dtype and unpacks the results."""
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        D = state.grad_var.dtype
        f = None if value is None else jnp.asarray(value).astype(D)
        buffers_in = treedef.flatten_up_to(state.momentum_buffer)
        retained_in = treedef.flatten_up_to(state.retained) if gradient_retention else None
        if segments is not None:
            if len(leaves) != 1 or tuple(leaves[0].shape) != (segments.total,):
                raise ValueError(
                    f"EnhancedSGD with segments=FlatLayout expects one flat buffer of {segments.total} elements; "
                    f"got leaves of shapes {[tuple(g.shape) for g in leaves]}.")
            n = segments.num_tensors
            packs = [F.Pack(segments, tuple(range(n)), jnp.dtype(leaves[0].dtype))]
            flat_g, flat_b = [leaves[0]], [buffers_in[0]]
            flat_r = [retained_in[0]] if gradient_retention else None
            tmask = None
            if grad_mask is not None:
                m = treedef.flatten_up_to(grad_mask)[0]
                if m is not None:
                    m = jnp.asarray(m, bool)
                    if m.shape != (segments.num_segments,):
                        raise ValueError(f"Invalid grad_mask: shape {m.shape}; the flat layout takes one bool per "
                                         f"segment ({segments.num_segments}: {n} tensors and the padding).")
                    tmask = m[:n]
            lr_leaves = jax.tree.leaves(learning_rate)
            mom_leaves = jax.tree.leaves(momentum)
            for name, vals in (("learning_rate", lr_leaves), ("momentum", mom_leaves)):
                if len(vals) not in (1, n):
                    raise ValueError(f"Invalid {name}: {len(vals)} values; with segments=FlatLayout it is one "
                                     f"value or one per tensor ({n}).")
            lrs = lr_leaves * n if len(lr_leaves) == 1 else lr_leaves
            moms = mom_leaves * n if len(mom_leaves) == 1 else mom_leaves
            shapes = None
        else:
            n = len(leaves)
            packs = F.plan_packs(leaves)
            flat_g = [F.pack(leaves, p) for p in packs]
            flat_b = [F.pack(buffers_in, p) for p in packs]
            flat_r = [F.pack(retained_in, p) for p in packs] if gradient_retention else None
            tmask = None
            if grad_mask is not None:
                ms = treedef.flatten_up_to(grad_mask)
                if any(m is not None for m in ms):
                    tmask = jnp.stack([jnp.ones((), bool) if m is None else jnp.asarray(m, bool).reshape(())
                                       for m in ms])
            lrs = _per_leaf(learning_rate, treedef)
            moms = _per_leaf(momentum, treedef)
            shapes = [g.shape for g in leaves]
        statics = [F.static_of(p.layout, gradient_centering, centering_axis) for p in packs]
        single = len(packs) == 1 and packs[0].tensors == tuple(range(n))
        order = np.argsort(np.concatenate([np.asarray(p.tensors, np.int32) for p in packs])) if not single else None

        def to_global(parts):
            """Per-tensor vectors of the packs (per segment, dead entry last) as one vector in tensor order."""
            if single:
                return parts[0][:n]
            return jnp.concatenate([v[:p.size] for v, p in zip(parts, packs)])[order]

        def to_local(vec, p, dead):
            """A per-tensor vector (tensor order) as pack ``p``'s per-segment vector (``dead`` last)."""
            idx = np.asarray(p.tensors, np.int32)
            local = vec if single else vec[idx]
            return jnp.concatenate([local, jnp.full((1,), dead, vec.dtype)])

        # Which elements count: every tensor element (not the padding) of an unmasked tensor.
        included = []
        for p, st in zip(packs, statics):
            seg = jnp.asarray(st.seg_ids)
            if tmask is None:
                included.append(seg < p.size)
            else:
                included.append(to_local(tmask, p, False)[seg])
        numel = jnp.asarray(np.concatenate([st.numels[:p.size] for p, st in zip(packs, statics)])[order]
                            if not single else statics[0].numels[:n]).astype(D)
        count_n = jnp.sum(numel if tmask is None else jnp.where(tmask, numel, 0))

        # Pass 1: per-tensor sums (fixed order, flat.py), the range and finiteness of the counted elements.
        local_sums, los, his, finite = [], [], [], jnp.ones((), bool)
        for g, inc, p, st in zip(flat_g, included, packs, statics):
            wd = _work_dtype(g.dtype)
            local_sums.append(F.tensor_sums(jnp.where(inc, g.astype(wd), 0), st, p.layout.num_segments))
            lo_p, hi_p, ok = F.range_and_finite(g, inc)
            los.append(lo_p.astype(jnp.float32))
            his.append(hi_p.astype(jnp.float32))
            finite = finite & ok
        if f is not None:
            finite = finite & jnp.isfinite(f)
        sums = to_global([s.astype(D) for s in local_sums])
        if tmask is not None:
            sums = jnp.where(tmask, sums, 0)
        lo, hi = jnp.min(jnp.stack(los)), jnp.max(jnp.stack(his))

        def step(state: EnhancedSGDState):
            # One split gives the next key, the controller's key and one noise key per tensor (as per leaf).
            keys = jax.random.split(state.key, 2 + n)
            key, k_ctrl, tensor_keys = keys[0], keys[1], keys[2:]
            total = count_n
            grad_mean = jnp.sum(sums) / jnp.maximum(total, 1)
            # Variance pass, scaled by a power of two once max|g| reaches 2³² (see the per-leaf path).
            scale, inv_scale = _variance_scale(lo, hi)
            local_sq = []
            for g, inc, p, st in zip(flat_g, included, packs, statics):
                wd = _work_dtype(g.dtype)
                inv = inv_scale.astype(wd)
                sq = jnp.square(g.astype(wd) * inv - grad_mean.astype(wd) * inv)
                local_sq.append(F.tensor_sums(jnp.where(inc, sq, 0), st, p.layout.num_segments).astype(D))
            squares = to_global(local_sq)
            if tmask is not None:
                squares = jnp.where(tmask, squares, 0)
            var = jnp.sum(squares) / jnp.maximum(total - 1, 1)
            var = (var * scale.astype(D)) * scale.astype(D)
            var = jnp.where(total > 1, var, 0)
            rounding = jnp.result_type(*[p.dtype for p in packs])
            width = hi - lo
            factor = jnp.where(width > 0, jnp.float32(entropy_bins) / jnp.where(width > 0, width, 1.0), 0.0)
            counts = sum(F.histogram_table(g, inc, entropy_bins, lo, factor) for g, inc in zip(flat_g, included))
            gv, clip, hn, hbar, fields, lr_factor, mom_factor = statistics_step(
                state, var, rounding, counts, total, lo, hi, f, k_ctrl)
            lr_t = jnp.stack([jnp.asarray(lr).astype(D) for lr in lrs]) * lr_factor
            mom_t = jnp.minimum(jnp.stack([jnp.asarray(mu).astype(D) for mu in moms]) * mom_factor, max_momentum)

            insert = hn >= hbar
            n_ret = state.retained_count
            if gradient_retention:
                w = jnp.asarray(retention_weight).astype(D)
                inverse_bc = 1 / C.bias_correction_from(1.0 / gradient_buffer_size, jnp.maximum(n_ret, 1), D)

            else:
                w = inverse_bc = jnp.zeros((), D)
            new_bufs, new_rets, outs = [], [], []
            for j, (g, inc, p, st) in enumerate(zip(flat_g, included, packs, statics)):
                wd = _work_dtype(g.dtype)
                seg = jnp.asarray(st.seg_ids)
                b = flat_b[j]

                def processed(g=g, p=p, st=st, seg=seg, wd=wd, j=j):
                    """Centering, clipping and noise (steps a–c) over the buffer, in its work dtype."""
                    x = g.astype(wd)
                    kind = jnp.asarray(st.centre_kind)[seg]
                    pos = (jax.lax.iota(jnp.int32, g.shape[0]) - jnp.asarray(st.offsets)[seg]).astype(jnp.uint32)
                    if gradient_centering is True and st.num_slices:
                        sid = jnp.where(kind == 1, jnp.asarray(st.slice_base)[seg]
                                        + (pos // jnp.asarray(st.slice_stride, jnp.uint32)[seg]).astype(jnp.int32)
                                        % jnp.asarray(st.slice_dim)[seg], st.num_slices)
                        slice_sums = jax.ops.segment_sum(jnp.where(inc, x, 0), sid, num_segments=st.num_slices + 1)
                        means = slice_sums[:st.num_slices] / jnp.asarray(st.slice_count).astype(wd)
                        means = jnp.concatenate([means, jnp.zeros((1,), wd)])
                        x = jnp.where(kind == 1, x - means[sid], x)
                    if gradient_centering == "all":
                        seg_mean = local_sums[j] / jnp.maximum(jnp.asarray(st.numels), 1).astype(wd)
                        x = jnp.where(kind == 2, x - seg_mean.astype(wd)[seg], x)
                    if gradient_clipping:
                        c = clip.astype(wd)
                        x = jnp.where(gv > 0, jnp.clip(x, -c, c), x)
                    if apply_noise:
                        k = jnp.concatenate([tensor_keys[np.asarray(p.tensors, np.int32)],
                                             jnp.zeros((1, 2), jnp.uint32)])
                        bits = _mix32(_mix32(pos + k[:, 0][seg]) ^ k[:, 1][seg])
                        x = x + jnp.asarray(noise_scale).astype(wd) * normal_from_bits(bits).astype(wd)
                    return x

                def elementwise(g=g, inc=inc, p=p, seg=seg, wd=wd, b=b, j=j, processed=processed):
                    """Retention, momentum and update (steps d–e and 6) of a finite step."""
                    if apply_noise and gradient_retention:
                        # Materialised once, as the output of a conditional (see the per-leaf path).
                        x = jax.lax.cond(finite, processed, lambda: jnp.zeros(g.shape, wd))
                    else:
                        x = processed()
                    processed_x = x
                    r_new = None
                    if gradient_retention:
                        r = flat_r[j]
                        # (1 − w)·x + w·R̂ written as x + w·(R̂ − x): every add then has at most one product
                        # operand. XLA:CPU contracts a product and an add into an FMA; where an add has two
                        # product operands, which one it contracts may differ between two compiled programs.
                        blend = x + w.astype(wd) * (r.astype(wd) * inverse_bc.astype(wd) - x)
                        x = jnp.where(n_ret > 0, blend, x)
                    mom_e = to_local(mom_t, p, 0).astype(wd)[seg]
                    b_new = jnp.where(inc, (mom_e * b.astype(wd) + x).astype(b.dtype), b)
                    if gradient_retention:
                        # ordered after the new momentum buffer, so that it overwrites the old average in place
                        r_new = r.astype(wd) + (1.0 - rho) * (processed_x - r.astype(wd))  # ρ·R + (1 − ρ)·x
                        r_new = jnp.where(inc & insert, r_new.astype(r.dtype), r)
                        token = _first_element(b_new)
                        r_new = r_new if token is None else C.ordered_after(token, r_new)
                    lr_e = to_local(lr_t, p, 0).astype(wd)[seg]
                    u = (-lr_e * b_new.astype(wd)).astype(g.dtype)
                    return b_new, r_new, jnp.where(inc, u, jnp.zeros_like(u))

                def unchanged(g=g, b=b, j=j):
                    """A non-finite step: the buffers kept, a zero update."""
                    return b, flat_r[j] if gradient_retention else None, jnp.zeros_like(g)

                # The pass runs as a conditional on the step's finiteness (a skipped step does no work), whose
                # outputs are materialised buffers: otherwise XLA:CPU fuses the pytree layout's cutting into
                # leaves into this pass, compiling one loop per leaf (compile time grows with the leaves, and
                # the loops' vectorised bodies and scalar tails contract products into FMAs differently from
                # the flat layout's single loop, so the results would differ in the last bit).
                b_new, r_new, u = jax.lax.cond(finite, elementwise, unchanged)
                new_bufs.append(b_new)
                new_rets.append(r_new)
                outs.append(u)

            fields.update(
                count=C.safe_increment(state.count), key=key,
                retained_count=jnp.where(insert, C.safe_increment(n_ret), n_ret) if gradient_retention else n_ret,
                last_lr=lr_t[0].astype(D), last_momentum=mom_t[0].astype(D), last_entropy=hn,
            )
            if "last_spike" not in fields:
                fields["last_spike"] = jnp.zeros((), bool)
            new_state = state._replace(**fields)
            new_state = jax.tree.map(lambda n_, o: n_.astype(o.dtype), new_state, state)
            return (new_bufs, new_rets, outs), new_state

        (new_bufs, new_rets, outs), stepped = step(state)
        skipped = state._replace(skipped=C.safe_increment(state.skipped))
        new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), stepped, skipped)

        def unflatten(flats):
            if segments is not None:
                return treedef.unflatten(flats)
            out = [None] * n
            for flat_x, p in zip(flats, packs):
                for i, leaf in zip(p.tensors, F.unpack(flat_x, p, [shapes[i] for i in p.tensors])):
                    out[i] = leaf
            return treedef.unflatten(out)

        new_state = new_state._replace(
            momentum_buffer=unflatten(new_bufs),
            retained=unflatten(new_rets) if gradient_retention else None)
        return unflatten(outs), new_state

    def dispatch_update_fn(updates, state, params=None, **extra_args):
        # Under a mesh with explicit axes, packing sharded leaves would need collectives: per leaf there.
        if segments is None and E.explicit_spec() is not None:
            return update_fn(updates, state, params, **extra_args)
        if not jax.tree.leaves(updates):
            return update_fn(updates, state, params, **extra_args)
        return flat_update_fn(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, dispatch_update_fn)


@C.declare_static(
    "lookahead_k", "apply_noise", "adaptive_momentum", "gradient_centering", "centering_axis",
    "gradient_clipping", "gradient_retention", "gradient_buffer_size", "lr_scale_bounds",
    "momentum_scale_bounds", "max_momentum", "spike_recovery_steps", "entropy_bins", "bayesian_init",
    "bayesian_prior_std", "segments", init_only=("q_epsilon", "q_initial_mix_prob", "seed"),
)
@nonfinite_option(value=True)
def enhanced_sgd(
    learning_rate: Any = 0.01,
    momentum: Any = 0.9,
    smoothing_factor: Any = 0.1,
    noise_scale: Any = 1e-4,
    entropy_weight: Any = 0.1,
    loss_correction_factor: Any = 0.5,
    retention_weight: Any = 0.1,
    q_learning_rate: Any = 0.1,
    q_discount: Any = 0.9,
    q_epsilon: Any = 0.5,
    q_epsilon_decay: Any = 0.995,
    q_epsilon_min: Any = 0.01,
    q_initial_mix_prob: Any = 0.8,
    lookahead_alpha: Any = 0.5,
    *,
    lookahead_k: int = 5,
    apply_noise: bool = True,
    adaptive_momentum: bool = True,
    gradient_centering: Any = True,
    centering_axis: int = 0,
    gradient_clipping: bool = True,
    gradient_retention: bool = True,
    gradient_buffer_size: int = 100,
    lr_scale_bounds: Sequence[float] = (0.5, 1.5),
    momentum_scale_bounds: Sequence[float] = (0.9, 1.1),
    max_momentum: float = 0.99,
    spike_recovery_steps: int = 10,
    entropy_bins: int = 100,
    bayesian_init: bool = False,
    bayesian_prior_std: float = 0.05,
    seed: int = 0,
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""EnhancedSGD: :func:`scale_by_enhanced_sgd` wrapped in lookahead (slow weights every ``k`` steps).

    .. math::
        \text{fast: } \theta \leftarrow \theta - \mathrm{lr}_t\, b_t \text{ (see } scale\_by\_enhanced\_sgd),\qquad
        \text{every } k \text{ steps: } \phi \leftarrow \phi + \alpha(\theta - \phi),\; \theta \leftarrow \phi

    The arguments ``learning_rate`` … ``q_initial_mix_prob`` and the keyword-only options ``apply_noise`` …
    ``seed`` are those of :func:`scale_by_enhanced_sgd`; the two below are this function's own.

    Args:
      lookahead_alpha: slow step size ``α ∈ (0, 1]`` (weight of the fast weights at a sync).
      lookahead_k: sync period ``k ≥ 0``; 0 disables lookahead (the result is the inner transformation).

    The keyword-only option ``nonfinite`` (added by :func:`jaxopt_suite.nonfinite.nonfinite_option`):
    ``"propagate"`` (default) is EnhancedSGD's own handling, the inner step is skipped (zero update,
    ``skipped`` advances) when a gradient or the loss is not finite, while the surrounding lookahead still
    counts the step. ``"skip"``: the whole optimizer, lookahead included, is left bit-identical and the step
    counts in ``SkipNonFiniteState.skips``. ``"raise"``: ``FloatingPointError`` naming the leaf or the loss.

    Extra args: ``value`` (the loss; enables the controller and spike handling), ``grad_mask``; forwarded to
    the inner transformation by lookahead.

    A step skipped for a non-finite gradient or loss is skipped by the lookahead as well
    (``lookahead(..., skip_if=skipped_step)``): zero update, the slow weights and the lookahead counter
    unchanged, no synchronisation (the next step taken synchronises instead); only ``skipped`` advances.

    References:
      Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", arXiv:1907.08610; see
      :mod:`jaxopt_suite.enhanced_sgd.transform` for the rest.
    """
    _check_int("lookahead_k", lookahead_k, 0)
    if lookahead_k:
        C.check_range("lookahead_alpha", lookahead_alpha, gt=0.0, le=1.0)
    inner = scale_by_enhanced_sgd(
        learning_rate, momentum, smoothing_factor, noise_scale, entropy_weight, loss_correction_factor,
        retention_weight, q_learning_rate, q_discount, q_epsilon, q_epsilon_decay, q_epsilon_min,
        q_initial_mix_prob, apply_noise=apply_noise, adaptive_momentum=adaptive_momentum,
        gradient_centering=gradient_centering, centering_axis=centering_axis,
        gradient_clipping=gradient_clipping, gradient_retention=gradient_retention,
        gradient_buffer_size=gradient_buffer_size, lr_scale_bounds=lr_scale_bounds,
        momentum_scale_bounds=momentum_scale_bounds, max_momentum=max_momentum,
        spike_recovery_steps=spike_recovery_steps, entropy_bins=entropy_bins, bayesian_init=bayesian_init,
        bayesian_prior_std=bayesian_prior_std, seed=seed, segments=segments,
    )
    if lookahead_k == 0:
        return inner
    from ..lookahead import lookahead  # the suite's own lookahead wrapper

    return lookahead(inner, sync_period=lookahead_k, slow_step_size=lookahead_alpha, skip_if=skipped_step)


def skipped_step(old_state: PyTree, new_state: PyTree) -> jax.Array:
    """Whether the update from ``old_state`` to ``new_state`` was a skipped (non-finite) step: its
    ``skipped`` counter advanced. Lookahead reads it so that a skipped step does not synchronise."""
    return find_enhanced_state(new_state).skipped != find_enhanced_state(old_state).skipped
