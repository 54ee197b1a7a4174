"""Lookahead against the seed formula (α = 0.8), pytorch_optimizer's Lookahead and optax.lookahead."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

po = pytest.importorskip("pytorch_optimizer")

from jaxopt_suite import (  # noqa: E402
    AdamState, LookaheadState, SGDState, adam, lookahead, lookahead_adam, lookahead_sgd,
    lookahead_slow_params, sgd,
)
from tests.jaxopt_suite.torch_family_utils import (  # noqa: E402
    JaxSide, TorchSide, compare, find_state, flat_vs_tree, max_diff, precision,
)

K, ALPHA = 5, 0.8  # α ≠ 0.5: at 0.5 the swapped convention would give identical results
TOL64 = 1e-13
TOL32 = 5e-6        # quad/mlp, 100 steps (torch_semantics.md §7)
TOL32_ADAM = 1e-5   # Adam inner (§7: "vs optax adam 1e-5")
# optax's f32 bias correction 1 − β2^t is 1.3e-5 off (relative) at t = 1; with reset_state=True Adam restarts at
# t = 1 every k steps, so optax drifts further from the exact correction (f64 shows the rules agree).
TOL32_OPTAX_ADAM_RESET = 5e-5


class SeedLookahead:
    """The project's seed formula (001): every k-th step p ← α p + (1 − α) q, then q ← p."""

    def __init__(self, optimizer, k, alpha):
        self.optimizer, self.k, self.alpha, self.steps = optimizer, k, alpha, 0
        self.slow = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def step(self):
        self.steps += 1
        self.optimizer.step()
        if self.steps % self.k == 0:
            for group, slow in zip(self.optimizer.param_groups, self.slow):
                for p, q in zip(group["params"], slow):
                    p.mul_(self.alpha).add_(q, alpha=1.0 - self.alpha)
                    q.copy_(p)


def seed_sgd(alpha=ALPHA):
    return lambda p: SeedLookahead(torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False), K, alpha)


def seed_adam(alpha=ALPHA):
    return lambda p: SeedLookahead(torch.optim.Adam(p, lr=1e-2, foreach=False), K, alpha)


def ours_sgd(**kw):
    return lookahead_sgd(0.05, 0.9, sync_period=K, slow_step_size=kw.pop("alpha", ALPHA), **kw)


def ours_adam(**kw):
    return lookahead_adam(1e-2, sync_period=K, slow_step_size=kw.pop("alpha", ALPHA), **kw)


@pytest.mark.parametrize("problem", ["quad", "mlp"])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_matches_seed_formula(problem, inner):
    ours, ref = (ours_sgd, seed_sgd) if inner == "sgd" else (ours_adam, seed_adam)
    with precision("f64"):
        diff = compare(JaxSide(ours(), problem, "f64"), TorchSide(ref(), problem, "f64"), steps=200)
    assert diff <= TOL64, diff
    with precision("f32"):
        diff32 = compare(JaxSide(ours(), problem, "f32"), TorchSide(ref(), problem, "f32"), steps=100)
    assert diff32 <= (TOL32 if inner == "sgd" else TOL32_ADAM), diff32


@pytest.mark.parametrize("problem", ["quad", "mlp"])
def test_swapped_alpha_is_far(problem):
    """Sensitivity: α weighting the slow weights instead (equivalently α → 1 − α) is a different algorithm."""
    with precision("f64"):
        wrong = compare(JaxSide(ours_sgd(alpha=1 - ALPHA), problem, "f64"), TorchSide(seed_sgd(), problem, "f64"),
                        steps=200)
    assert wrong > 10 * TOL64 and wrong > 0.1, wrong


@pytest.mark.parametrize("reset, pullback", [("none", "none"), ("momentum", "reset")])
def test_matches_pytorch_optimizer(reset, pullback):
    make = lambda p: po.Lookahead(  # noqa: E731
        torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False), k=K, alpha=ALPHA, pullback_momentum=pullback)
    with precision("f64"):
        diff = compare(JaxSide(ours_sgd(reset=reset), "quad", "f64"), TorchSide(make, "quad", "f64"), steps=200)
        # the momentum reset matters: without it the trajectory is elsewhere
        other = compare(JaxSide(ours_sgd(reset="none" if reset == "momentum" else "momentum"), "quad", "f64"),
                        TorchSide(make, "quad", "f64"), steps=200)
    assert diff <= TOL64, diff
    assert other > 10 * TOL64, other


def _optax_side(tx, problem, dtype):
    return JaxSide(tx, problem, dtype, wrap=optax.LookaheadParams.init_synced, unwrap=lambda p: p.fast)


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("inner, reset", [("sgd", False), ("adam", False), ("adam", True)])
def test_matches_optax_lookahead_fast_and_slow(dtype, inner, reset):
    def inner_opt(optax_side):
        if inner == "sgd":
            return optax.sgd(0.05, 0.9) if optax_side else sgd(0.05, 0.9)
        return optax.adam(1e-2, eps_root=0.0) if optax_side else adam(1e-2)

    steps = 200 if dtype == "f64" else 100
    with precision(dtype):
        ours = JaxSide(lookahead(inner_opt(False), K, ALPHA, reset="inner" if reset else "none"), "quad", dtype)
        ref = _optax_side(optax.lookahead(inner_opt(True), K, ALPHA, reset_state=reset), "quad", dtype)
        fast = slow = 0.0
        for _ in range(steps):
            ours.step()
            ref.step()
            fast = max(fast, max_diff(ours.fast(), ref.fast()))
            slow = max(slow, max_diff(lookahead_slow_params(ours.state), ref.params.slow))
    tol = TOL64 if dtype == "f64" else (
        TOL32 if inner == "sgd" else (TOL32_OPTAX_ADAM_RESET if reset else TOL32_ADAM))
    assert fast <= tol, fast
    assert slow <= tol, slow


def test_slow_equals_fast_bitwise_after_sync_and_count_cycles():
    with precision("f32"):
        side = JaxSide(ours_adam(), "mlp", "f32")
        for t in range(1, 11):
            side.step()
            assert int(side.state.count) == t % K
            slow = lookahead_slow_params(side.state)
            if t % K == 0:
                for a, b in zip(side.fast(), slow):
                    np.testing.assert_array_equal(a, np.asarray(b))
            else:
                assert max_diff(side.fast(), slow) > 0


def test_forwards_extra_args_to_inner():
    """``value`` reaches an inner transformation that requires it; ``grad_mask`` reaches the inner alias."""
    inner = optax.chain(sgd(0.1, 0.9), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    tx = lookahead(inner, 3, ALPHA)
    params = [jnp.ones(3), jnp.full(2, 2.0)]
    state = tx.init(params)
    grads = [jnp.full(3, 0.5), jnp.full(2, -0.3)]
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    for v in [1.0, 2.0, 3.0, 4.0]:
        _, state = step(grads, state, params, jnp.asarray(v))
    plateau = find_state(state, optax.contrib.ReduceLROnPlateauState)
    assert float(plateau.scale) < 1.0
    with pytest.raises(TypeError, match="value"):
        tx.update(grads, tx.init(params), params)

    tx = lookahead(sgd(0.1, 0.9), 3, ALPHA)
    state = tx.init(params)
    u, new = tx.update(grads, state, params, grad_mask=[True, False], unexpected_extra_arg=1)
    np.testing.assert_array_equal(np.asarray(u[1]), 0.0)
    old_sgd, new_sgd = find_state(state, SGDState), find_state(new, SGDState)
    np.testing.assert_array_equal(np.asarray(new_sgd.momentum_buffer[1]), np.asarray(old_sgd.momentum_buffer[1]))
    assert int(new_sgd.count[1]) == 0 and int(new_sgd.count[0]) == 1


def test_sync_moves_masked_leaves_too():
    tx = lookahead(sgd(0.1), 2, ALPHA)
    params = [jnp.ones(3), jnp.full(2, 2.0)]
    state = tx.init(params)
    grads = [jnp.full(3, 0.5), jnp.full(2, -0.3)]
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
    u, state = tx.update(grads, state, params, grad_mask=[True, False])  # sync step
    assert int(state.count) == 0
    # leaf 1 was moved by its own first step; at the sync it is pulled back toward the slow weights
    expected = 2.0 + ALPHA * ((2.0 + 0.03) - 2.0) - (2.0 + 0.03)
    np.testing.assert_allclose(np.asarray(u[1]), expected, rtol=1e-5)


def test_reset_inner_and_momentum_at_sync():
    params = [jnp.ones(3)]
    grads = [jnp.full(3, 0.5)]
    for reset in ["inner", "momentum"]:
        tx = lookahead(adam(1e-2), 2, ALPHA, reset=reset)
        state = tx.init(params)
        for _ in range(2):
            _, state = tx.update(grads, state, params)
        core = find_state(state, AdamState)
        np.testing.assert_array_equal(np.asarray(core.mu[0]), 0.0)
        if reset == "inner":
            np.testing.assert_array_equal(np.asarray(core.nu[0]), 0.0)
            assert int(core.count[0]) == 0
        else:
            assert np.all(np.asarray(core.nu[0]) > 0) and int(core.count[0]) == 2


def test_inject_hyperparams_and_plain_factory_agree():
    with precision("f64"):
        plain = JaxSide(ours_sgd(), "quad", "f64")
        injected = JaxSide(optax.inject_hyperparams(lookahead_sgd, static_args=("reset",),
                                                    hyperparam_dtype=jnp.float64)(
            0.05, 0.9, sync_period=K, slow_step_size=ALPHA), "quad", "f64")
        diff = compare(plain, injected, steps=12)
    # Not bitwise: the injected λ is traced, and the coupled decay's select (torch skips the term at λ == 0)
    # makes XLA fuse the step differently (measured 4.4e-15 on O(1) values). Bound: 12 steps, a few roundings
    # each, of values below ~10 -> 12 * 8 * 10 * eps64 ~ 2e-13.
    assert diff <= 12 * 8 * 10 * np.finfo(np.float64).eps, diff
    assert int(injected.state.hyperparams["sync_period"]) == K


def test_works_with_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, ours_sgd(), wrt=nnx.Param)
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))

    @nnx.jit
    def train_step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads, value=loss)
        return loss

    losses = [float(train_step(model, opt)) for _ in range(2 * K)]
    assert losses[-1] < losses[0]
    slow = lookahead_slow_params(opt.opt_state)  # a sync happened at the last step: slow == fast
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(slow)[0]),
                                  np.asarray(jax.tree.leaves(nnx.state(model, nnx.Param))[0]))


@pytest.mark.parametrize("kwargs, name", [
    ({"sync_period": 0}, "sync_period"),
    ({"sync_period": -3}, "sync_period"),
    ({"sync_period": 2.5}, "sync_period"),
    ({"sync_period": True}, "sync_period"),
    ({"slow_step_size": 0.0}, "slow_step_size"),
    ({"slow_step_size": 1.5}, "slow_step_size"),
    ({"slow_step_size": -0.2}, "slow_step_size"),
    ({"reset": "pullback"}, "reset"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        lookahead(sgd(0.1), **kwargs)
    msg = str(err.value)
    assert "allowed range" in msg or "expected" in msg
    with pytest.raises(ValueError, match=name):
        lookahead_sgd(0.1, **kwargs)


def test_bad_inner_arguments_are_checked_by_the_factories():
    with pytest.raises(ValueError, match="learning_rate"):
        lookahead_sgd(-0.1)
    with pytest.raises(ValueError, match="b2"):
        lookahead_adam(1e-3, b2=1.0)
    with pytest.raises(ValueError, match="nesterov"):
        lookahead_sgd(0.1, nesterov=True)


def test_update_requires_params():
    tx = lookahead(sgd(0.1), 2, ALPHA)
    params = [jnp.ones(3)]
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


def test_flat_layout_matches_pytree():
    masks = lambda t: [True, t % 3 != 1]  # noqa: E731
    with precision("f64"):
        diff, pad, state = flat_vs_tree(
            lambda segments: lookahead_adam(1e-2, weight_decay=0.1, sync_period=3, slow_step_size=ALPHA,
                                            segments=segments), masks=masks)
    assert diff <= 1e-12, diff
    assert pad == 0.0, pad
    assert np.asarray(find_state(state, AdamState).count[0]).tolist() == [30, 20, 30]
