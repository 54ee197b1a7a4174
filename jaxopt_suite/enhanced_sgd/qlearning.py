"""Tabular Q-learning controller of EnhancedSGD's learning-rate and momentum scales, as pure functions.

**States** (27): ``s = 9τ + 3ν + η`` with three trend features, each 0 (falling), 1 (level), 2 (rising):

* τ, loss trend: ``d = (f − f̄_prev) / max(|f̄_prev|, 1e-12)`` against the running loss mean before ``f``;
  τ = 0 if ``d < −0.01``, 2 if ``d > 0.01``, else 1 (1 without loss history);
* ν, gradient-variance trend: ``dv = (v − v_prev) / v_prev``; thresholds ±0.05 (1 if ``v_prev ≤ 0``);
* η, entropy against its running mean: ``dH = H − H̄``; thresholds ±0.02.

**Actions** (18): ``a = 9·type + 3·i + j`` with ``type`` 0 = multiplicative (scale × (1 + 0.05·δ)) or
1 = additive (scale + 0.005·δ), and ``δ_lr = I[i]``, ``δ_m = I[j]`` with ``I = (0, −1, +1)``. Action 0 (and 9)
leaves both scales unchanged, so the first maximum of an all-zero row is a no-op.

**Learning** (Watkins & Dayan 1992): ``Q[s, a] ← Q[s, a] + α (r + γ max_b Q[s', b] − Q[s, a])``.
**Policy**: ε-greedy; exploration picks the action type with probability ``mix_prob`` for multiplicative
and the two step directions uniformly.

Everything is scalar ``jnp`` arithmetic with dynamic indexing: no host synchronisation.

References:
  Watkins & Dayan, "Q-learning", Machine Learning 8, 279–292 (1992). DOI:10.1007/BF00992698.
  Sutton & Barto, "Reinforcement Learning: An Introduction", 2nd ed., §6.5 (ε-greedy Q-learning).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

NUM_STATES = 27
NUM_ACTIONS = 18
LOSS_TREND_THRESHOLD = 0.01
VARIANCE_TREND_THRESHOLD = 0.05
ENTROPY_TREND_THRESHOLD = 0.02
MULTIPLICATIVE_STEP = 0.05
ADDITIVE_STEP = 0.005


def _trend(x: jax.Array, threshold: float) -> jax.Array:
    """0 if ``x < −threshold``, 2 if ``x > threshold``, else 1 (int32)."""
    return jnp.where(x < -threshold, 0, jnp.where(x > threshold, 2, 1)).astype(jnp.int32)


def discretize(
    loss: jax.Array,
    prev_loss_mean: jax.Array,
    has_loss_history: jax.Array,
    grad_var: jax.Array,
    prev_grad_var: jax.Array,
    entropy: jax.Array,
    entropy_mean: jax.Array,
) -> jax.Array:
    """The controller state ``s = 9τ + 3ν + η ∈ {0, …, 26}`` (int32); see the module docstring.

    Args:
      loss: this step's loss ``f``.
      prev_loss_mean: mean of the loss window before ``f`` was inserted (ignored without history).
      has_loss_history: whether that window held any loss.
      grad_var: the smoothed gradient variance of this step.
      prev_grad_var: its value at the previous valued step (0 before any: ν = 1).
      entropy: this step's normalised gradient entropy.
      entropy_mean: the running mean of the entropy before this step.
    """
    rel_loss = (loss - prev_loss_mean) / jnp.maximum(jnp.abs(prev_loss_mean), 1e-12)
    tau = jnp.where(has_loss_history, _trend(rel_loss, LOSS_TREND_THRESHOLD), 1)
    positive = prev_grad_var > 0
    rel_var = (grad_var - prev_grad_var) / jnp.where(positive, prev_grad_var, 1)
    nu = jnp.where(positive, _trend(rel_var, VARIANCE_TREND_THRESHOLD), 1)
    eta = _trend(entropy - entropy_mean, ENTROPY_TREND_THRESHOLD)
    return (9 * tau + 3 * nu + eta).astype(jnp.int32)


def transition_reward(
    prev_loss: jax.Array,
    loss: jax.Array,
    prev_entropy: jax.Array,
    entropy: jax.Array,
    prev_grad_var: jax.Array,
    grad_var: jax.Array,
    entropy_weight: Any,
) -> jax.Array:
    """Relative loss improvement minus an instability penalty::

        r = clip((f_prev − f) / max(|f_prev|, 1e-12), −1, 1)
            − w · (|H − H_prev| + min(|v − v_prev| / max(v_prev, 1e-30), 1))
    """
    gain = jnp.clip((prev_loss - loss) / jnp.maximum(jnp.abs(prev_loss), 1e-12), -1, 1)
    var_change = jnp.minimum(jnp.abs(grad_var - prev_grad_var) / jnp.maximum(prev_grad_var, 1e-30), 1)
    return gain - entropy_weight * (jnp.abs(entropy - prev_entropy) + var_change)


def q_learning_update(
    q_table: jax.Array,
    state: jax.Array,
    action: jax.Array,
    reward: jax.Array,
    next_state: jax.Array,
    learning_rate: Any = 0.1,
    discount: Any = 0.9,
) -> jax.Array:
    """Watkins' update of one entry: ``Q[s,a] += α (r + γ max_b Q[s',b] − Q[s,a])``; other entries unchanged.

    The target uses the table before the update (so a self-loop ``s' = s`` reads the old ``Q[s, a]``).
    """
    dtype = q_table.dtype
    target = jnp.asarray(reward, dtype) + jnp.asarray(discount, dtype) * jnp.max(q_table[next_state])
    delta = jnp.asarray(learning_rate, dtype) * (target - q_table[state, action])
    return q_table.at[state, action].add(delta.astype(dtype))


def epsilon_greedy(
    key: jax.Array,
    q_row: jax.Array,
    epsilon: Any,
    mix_prob: Any,
) -> jax.Array:
    """An action for one state's Q-values ``q_row`` (int32).

    With ``u1, u2 ~ U[0, 1)`` and ``c_lr, c_m ~ U{0, 1, 2}`` taken from four random 32-bit words of ``key``
    (uniforms on a 2²⁴ grid; ``word mod 3``, whose bias is 2⁻³²): if ``u1 < ε`` (explore) the action is
    ``9·type + 3·c_lr + c_m`` with ``type = 0`` (multiplicative) when ``u2 < mix_prob``, else 1 (additive);
    otherwise ``argmax q_row`` (the first maximum, so an all-zero row gives the no-op 0).
    """
    dtype = q_row.dtype
    words = jax.random.bits(key, (4,), jnp.uint32)
    uniforms = (words[:2] >> 8).astype(dtype) * (2.0**-24)
    u1, u2 = uniforms[0], uniforms[1]
    c_lr = (words[2] % 3).astype(jnp.int32)
    c_m = (words[3] % 3).astype(jnp.int32)
    action_type = jnp.where(u2 < jnp.asarray(mix_prob, dtype), 0, 1).astype(jnp.int32)
    random_action = 9 * action_type + 3 * c_lr + c_m
    greedy = jnp.argmax(q_row).astype(jnp.int32)
    return jnp.where(u1 < jnp.asarray(epsilon, dtype), random_action, greedy).astype(jnp.int32)


def decay_epsilon(epsilon: jax.Array, decay: Any, minimum: Any) -> jax.Array:
    """``max(ε_min, ε · decay)`` (one valued step)."""
    return jnp.maximum(jnp.asarray(minimum, epsilon.dtype), epsilon * jnp.asarray(decay, epsilon.dtype))


def _direction(index: jax.Array) -> jax.Array:
    """``I[index]`` with ``I = (0, −1, +1)``."""
    return jnp.asarray([0, -1, 1], jnp.int32)[index]


def apply_action(
    action: jax.Array,
    lr_scale: jax.Array,
    momentum_scale: jax.Array,
    lr_scale_bounds: Sequence[float] = (0.5, 1.5),
    momentum_scale_bounds: Sequence[float] = (0.9, 1.1),
    *,
    adaptive_momentum: bool = True,
):
    """The scales after ``action``: multiplicative ``× (1 + 0.05 δ)`` or additive ``+ 0.005 δ``, then clipped.

    Returns ``(lr_scale, momentum_scale)``, each clipped to its bounds; ``momentum_scale`` is returned
    unchanged when ``adaptive_momentum`` is False.
    """
    action = jnp.asarray(action, jnp.int32)
    additive = action // 9 == 1
    within = action % 9
    d_lr = _direction(within // 3).astype(lr_scale.dtype)
    d_m = _direction(within % 3).astype(momentum_scale.dtype)

    def step(scale, d):
        return jnp.where(additive, scale + ADDITIVE_STEP * d, scale * (1 + MULTIPLICATIVE_STEP * d))

    new_lr = jnp.clip(step(lr_scale, d_lr), lr_scale_bounds[0], lr_scale_bounds[1]).astype(lr_scale.dtype)
    if not adaptive_momentum:
        return new_lr, momentum_scale
    new_m = jnp.clip(step(momentum_scale, d_m), momentum_scale_bounds[0], momentum_scale_bounds[1])
    return new_lr, new_m.astype(momentum_scale.dtype)
