"""Each example runs on a few steps and does what it claims."""

import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

STEPS = 12


def test_nnx_training_with_lookahead_and_checkpoint():
    from examples import nnx_training

    metrics = nnx_training.main(["--steps", str(STEPS), "--batch-size", "64"])
    assert metrics["final_train_loss"] < metrics["initial_train_loss"]
    assert metrics["checkpoint_round_trip"] is True


def test_nnx_optimizer_state_holds_lookahead_slow_weights():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxopt_suite
    from examples import nnx_training

    model = nnx_training.MLP(64, 8, 10, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, nnx_training.make_optimizer(1e-2, 0.0), wrt=nnx.Param)
    x, y = jnp.ones((4, 64)), jnp.arange(4)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for _ in range(5):  # sync_period = 5: the 5th step pulls the fast weights to the slow ones
        nnx_training.train_step(model, opt, x, y)
    slow = jaxopt_suite.lookahead_slow_params(opt.opt_state)
    slow = nnx.to_pure_dict(slow) if isinstance(slow, nnx.State) else slow
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    for s, a, b in zip(jax.tree.leaves(slow), jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(s), np.asarray(a))  # fast == slow right after a sync
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


def test_linen_trainstate_delivers_value():
    from examples import linen_trainstate

    metrics = linen_trainstate.main(["--steps", str(STEPS), "--batch-size", "64"])
    assert metrics["final_train_loss"] < metrics["initial_train_loss"]
    assert metrics["step"] == STEPS
    assert 0.0 < metrics["plateau_scale"] <= 1.0


def test_optax_composition_logs_the_scheduled_lr():
    from examples import optax_composition

    peak = 3e-3
    metrics = optax_composition.main(["--steps", str(STEPS), "--learning-rate", str(peak), "--batch-size", "64"])
    assert metrics["final_train_loss"] < metrics["initial_train_loss"]
    schedule = optax.cosine_decay_schedule(init_value=peak, decay_steps=STEPS, alpha=0.01)
    expected = [float(schedule(i)) for i in range(STEPS)]  # the first update uses count 0
    np.testing.assert_allclose(metrics["learning_rates"], expected, rtol=1e-6)


def test_optax_composition_does_not_decay_biases_and_norms():
    import jax
    import jax.numpy as jnp

    from examples import optax_composition

    params = optax_composition.MLP().init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    tx = optax_composition.make_optimizer(1e-2, 10, weight_decay=0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, jax.jit(tx.init)(params), params)
    labels = optax_composition.decay_labels(params)
    for (path, u), label in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(labels)):
        if label == "no_decay":
            assert not np.any(np.asarray(u)), path  # zero gradient and no decay: no movement
        else:
            assert np.any(np.asarray(u)), path  # decoupled decay moves weight matrices


def test_hparam_sweep_vmap_equals_separate_runs():
    import jax
    import jax.numpy as jnp

    from examples import hparam_sweep

    lrs = [1e-3, 1e-2]
    metrics = hparam_sweep.main(["--steps", str(STEPS), "--learning-rates", ",".join(map(str, lrs)),
                                 "--batch-size", "64"])
    losses = np.asarray(metrics["losses"])
    assert losses.shape == (len(lrs), STEPS)
    assert all(final < curve[0] for final, curve in zip(metrics["final_train_loss"], losses))

    # One vmapped lane equals training alone with that learning rate.
    from examples._digits import batch_indices, digits_split

    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in digits_split(0))
    model = hparam_sweep.MLP()
    init = model.init(jax.random.key(0), x_train[:1])["params"]
    batches = jnp.asarray(batch_indices(len(x_train), STEPS, 64, 1))
    train = hparam_sweep.make_train(model, init, x_train, y_train, x_test, y_test, batches)
    alone, _, _ = jax.jit(train)(jnp.float32(lrs[1]))
    np.testing.assert_allclose(np.asarray(alone), losses[1], rtol=1e-4, atol=1e-6)
