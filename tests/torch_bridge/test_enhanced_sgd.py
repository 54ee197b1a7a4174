"""torch_bridge.EnhancedSGD: reference signature, JAX parity, closures, groups, state_dict resume."""

from __future__ import annotations

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxopt_suite
from jaxopt_suite.enhanced_sgd import find_enhanced_state
from torch_bridge import EnhancedSGD


def readme_model(seed: int, out: int = 1, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 50), torch.nn.ReLU(), torch.nn.Linear(50, out)).to(dtype)


def readme_data(seed: int, out: int = 1):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(1024, 10, generator=g)
    y = x @ torch.randn(10, out, generator=g) + 0.1 * torch.randn(1024, out, generator=g)
    return x, y


def batches(x, y, i, size=64):
    start = (i * size) % x.shape[0]
    return x[start:start + size], y[start:start + size]


def run_torch(model, opt, x, y, steps, *, mode="closure"):
    losses = []
    for i in range(steps):
        xb, yb = batches(x, y, i)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            return loss

        if mode == "closure":
            loss = opt.step(closure)
        elif mode == "value":
            loss = closure()
            opt.step(value=loss)
        else:
            loss = closure()
            opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_matches_jax_transformation_with_the_same_seed():
    """Teacher-forced: the JAX transformation gets the bridge's gradients and losses; params agree."""
    model = readme_model(0)
    x, y = readme_data(0)
    opt = EnhancedSGD(model.parameters(), lr=0.02, momentum=0.9, lookahead_k=3, seed=5)
    tx = jaxopt_suite.enhanced_sgd(learning_rate=0.02, momentum=0.9, lookahead_k=3, seed=5)
    params = [jnp.asarray(p.detach().numpy()) for p in model.parameters()]
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    for i in range(12):
        xb, yb = batches(x, y, i)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        grads = [jnp.asarray(p.grad.numpy()) for p in model.parameters()]
        u, state = update(grads, state, params, jnp.float32(loss.item()))
        params = optax.apply_updates(params, u)
        opt.step(value=loss)
        for p, q in zip(model.parameters(), params):
            np.testing.assert_allclose(p.detach().numpy(), np.asarray(q), rtol=0, atol=1e-7)
    ours = find_enhanced_state(state)
    np.testing.assert_allclose(opt.q_controller.q_table.numpy(), np.asarray(ours.q_table), rtol=1e-5, atol=1e-8)
    assert float(opt.q_controller.epsilon) == float(ours.epsilon)


@pytest.mark.parametrize("mode", ["closure", "value", "none"])
def test_step_modes_train_the_readme_model(mode):
    model = readme_model(1)
    x, y = readme_data(1)
    opt = EnhancedSGD(model.parameters(), lr=0.01, momentum=0.9, smoothing_factor=0.1, entropy_weight=0.1,
                      adaptive_momentum=True, seed=1)
    losses = run_torch(model, opt, x, y, 80, mode=mode)
    assert np.all(np.isfinite(losses)) and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    eps = float(opt.q_controller.epsilon)
    assert (eps < 0.5) == (mode != "none")  # the controller runs only with a loss


def test_closure_returning_a_python_float_and_current_epoch():
    model = readme_model(2)
    x, y = readme_data(2)
    opt = EnhancedSGD(model.parameters(), seed=0)
    for epoch in range(1, 4):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[:64]), y[:64])
            loss.backward()
            return float(loss.detach())

        assert isinstance(opt.step(closure, current_epoch=epoch), float)
    assert int(opt.state["controller"]["loss_count"]) == 3


def test_seed_none_follows_torch_manual_seed():
    def run():
        torch.manual_seed(123)
        model = readme_model(3)
        x, y = readme_data(3)
        opt = EnhancedSGD(model.parameters())
        run_torch(model, opt, x, y, 5)
        return [p.detach().clone() for p in model.parameters()]

    a, b = run(), run()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_state_dict_resume_is_bit_identical():
    x, y = readme_data(4)
    model = readme_model(4)
    opt = EnhancedSGD(model.parameters(), lookahead_k=4, seed=9)
    run_torch(model, opt, x, y, 6)
    sd = copy.deepcopy(opt.state_dict())
    snapshot = copy.deepcopy(model.state_dict())
    assert set(sd["state"][0]) == {"momentum_buffer", "retained", "slow"}
    controller = sd["state"]["controller"]
    # the PRNG key's uint32 words, held exactly as int64 (torch's uint32 tensors do not unpickle)
    assert controller["q_table"].shape == (27, 18) and controller["key"].dtype == torch.int64
    np.testing.assert_array_equal(controller["key"].numpy(), np.asarray(find_enhanced_state(opt._jstate).key))
    run_torch(model, opt, x, y, 5)  # continues (batches restart; irrelevant for the comparison)

    model2 = readme_model(99)
    model2.load_state_dict(snapshot)
    opt2 = EnhancedSGD(model2.parameters(), lookahead_k=4, seed=0)
    opt2.load_state_dict(sd)
    run_torch(model2, opt2, x, y, 5)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "pickled_state_dict", "uint32_key_state_dict"])
def test_copies_after_steps_continue_the_identical_trajectory(how):
    """Issue 15.5: after some steps the optimizer (with its model) survives ``pickle`` and ``copy.deepcopy``,
    its state dict survives ``pickle``, and a state dict holding the key as ``torch.uint32`` (the earlier
    format) loads; each copy continues the original's trajectory bit for bit, the PRNG key included."""
    x, y = readme_data(6)
    model = readme_model(6)
    opt = EnhancedSGD(model.parameters(), lookahead_k=3, seed=5)
    run_torch(model, opt, x, y, 4)
    key_before = np.asarray(find_enhanced_state(opt._jstate).key)
    if how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    elif how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        sd = opt.state_dict()
        if how == "pickled_state_dict":
            sd = pickle.loads(pickle.dumps(sd))
        else:
            sd = copy.deepcopy(sd)
            sd["state"]["controller"]["key"] = sd["state"]["controller"]["key"].to(torch.uint32)
        model2 = readme_model(99)
        model2.load_state_dict(copy.deepcopy(model.state_dict()))
        opt2 = EnhancedSGD(model2.parameters(), lookahead_k=3, seed=0)
        opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    np.testing.assert_array_equal(np.asarray(find_enhanced_state(opt2._ensure_state()).key), key_before)
    run_torch(model, opt, x, y, 5)
    run_torch(model2, opt2, x, y, 5)
    assert not np.array_equal(np.asarray(find_enhanced_state(opt._jstate).key), key_before)  # the key advanced
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    controller2 = opt2.state_dict()["state"]["controller"]
    for k, v in opt.state_dict()["state"]["controller"].items():  # bit for bit (NaN: no loss seen yet)
        torch.testing.assert_close(controller2[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


def test_generic_bridge_pickles_its_prng_key():
    """The generic ``JaxOptimizer(params, "enhanced_sgd")`` keeps the key under the group's ``'jax_state'``:
    the optimizer pickles after steps and the restored copy continues bit for bit."""
    import torch_bridge as tb

    x, y = readme_data(7)
    model = readme_model(7)
    opt = tb.JaxOptimizer(model.parameters(), "enhanced_sgd", lr=0.01, seed=4)
    run_torch(model, opt, x, y, 3, mode="value")
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.param_groups[0]["jax_state"] and opt2.param_groups[0]["params"][0] is next(model2.parameters())
    run_torch(model, opt, x, y, 3, mode="value")
    run_torch(model2, opt2, x, y, 3, mode="value")
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_param_groups_have_their_own_lr_and_momentum():
    model = readme_model(5)
    x, y = readme_data(5)
    opt = EnhancedSGD([{"params": model[0].parameters(), "lr": 0.02},
                       {"params": model[2].parameters(), "momentum": 0.5}], lr=0.01, seed=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    run_torch(model, opt, x, y, 3)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[1]["lr"] == 0.005
    losses = run_torch(model, opt, x, y, 3)
    assert np.all(np.isfinite(losses))
    inner = find_enhanced_state(opt._jstate)
    assert float(inner.last_lr) == pytest.approx(0.01 * float(inner.lr_scale) * (1 - 0.5 * float(inner.spike_level)),
                                                 rel=1e-5)
    with pytest.raises(ValueError, match="noise_scale"):
        EnhancedSGD([{"params": model[0].parameters(), "noise_scale": 0.1}])


def test_parameter_without_grad_is_untouched():
    model = readme_model(6)
    x, y = readme_data(6)
    opt = EnhancedSGD(model.parameters(), lookahead_k=0, seed=2)
    run_torch(model, opt, x, y, 2)
    frozen = model[0].bias
    before = frozen.detach().clone()
    buf = opt.state[frozen]["momentum_buffer"].clone()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x[:64]), y[:64]).backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)
    assert torch.equal(opt.state[frozen]["momentum_buffer"], buf)


def test_bfloat16_parameters():
    model = readme_model(7, dtype=torch.bfloat16)
    x, y = readme_data(7)
    opt = EnhancedSGD(model.parameters(), seed=7)
    losses = run_torch(model, opt, x.bfloat16(), y.bfloat16(), 60)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert np.all(np.isfinite(losses)) and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_nan_gradient_skips_the_step():
    model = readme_model(8)
    x, y = readme_data(8)
    opt = EnhancedSGD(model.parameters(), seed=2)
    run_torch(model, opt, x, y, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x[:64]), y[:64])
    loss.backward()
    model[2].weight.grad[0, 0] = float("nan")
    opt.step(value=loss)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert int(opt.state["controller"]["skipped"]) == 1


def test_digits_demo_settings_stay_finite():
    """The digits demo's bridge row (lr 0.05, momentum 0.9, seed 0, its weights and batches): its first 200
    steps stay finite and train. Its step 183 once drew +inf noise for one weight (a rounding edge of the noise
    generator), which no finiteness check on the gradient can catch."""
    pytest.importorskip("sklearn")
    demo = pytest.importorskip("examples.digits_comparison")
    config = demo.DemoConfig()
    data = demo.load_digits_data(config.seed, config.test_fraction)
    init = demo.init_flax_params(demo.make_flax_mlp(config.hidden, data.num_classes), data.num_features,
                                 config.seed)
    schedule = demo.batch_schedule(len(data.x_train), config.steps, config.batch_size, config.seed + 1)[:200]
    torch.manual_seed(config.seed)
    model = demo.make_torch_mlp(init)
    opt = EnhancedSGD(model.parameters(), lr=0.05, momentum=0.9, seed=config.seed)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train).long()
    losses = []
    for step, idx in enumerate(torch.from_numpy(schedule.astype(np.int64))):
        xb, yb = x[idx], y[idx]

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), f"non-finite weights at step {step}"
    assert np.all(np.isfinite(losses))
    with torch.no_grad():
        final = float(torch.nn.functional.cross_entropy(model(x), y))
    assert final < 0.25 * losses[0]
    state = find_enhanced_state(opt._ensure_state())
    assert all(bool(jnp.all(jnp.isfinite(b))) for b in state.momentum_buffer)
    assert int(state.skipped) == 0


def test_controller_view_and_helpers():
    model = readme_model(9)
    opt = EnhancedSGD(model.parameters(), seed=4)
    assert float(opt.q_controller.mix_prob) == pytest.approx(0.8)
    opt.q_controller.update_mix_prob(1.0, epoch=1)
    opt.q_controller.update_mix_prob(1.001)
    assert float(opt.q_controller.mix_prob) == pytest.approx(0.8 * 0.98)
    opt.bayesian_initialize_params()
    lr_scale = float(opt.q_controller.lr_scale)
    assert 0.5 <= lr_scale <= 1.5 and lr_scale != 1.0


def test_unsupported_and_invalid_arguments():
    params = readme_model(0).parameters()
    with pytest.raises(NotImplementedError):
        EnhancedSGD(params, layer_type_scaling={"Linear": 1.0})
    with pytest.raises(NotImplementedError):
        EnhancedSGD(readme_model(0).parameters(), grad_cam_scaling=True)
    with pytest.raises(ValueError, match="learning_rate"):
        EnhancedSGD(readme_model(0).parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="lr_scale_bounds"):
        EnhancedSGD(readme_model(0).parameters(), lr_scale_bounds=(2.0, 3.0))
    # accepted and ignored, as in the reference
    EnhancedSGD(readme_model(0).parameters(), model=None, decay=0.5, usage_case="CV", max_steps=10)


def test_non_finite_sync_step_keeps_params_and_slow_weights():
    # issue 15.5: a NaN gradient on a lookahead synchronisation step moved the parameters and slow weights
    model = readme_model(1)
    x, y = readme_data(1)
    opt = EnhancedSGD(model.parameters(), lr=0.02, lookahead_k=3, seed=4)
    run_torch(model, opt, x, y, 2, mode="value")
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x[:64]), y[:64])
    loss.backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step(value=loss)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    after = opt.state_dict()
    for i in range(len(params)):
        for key in ("slow", "momentum_buffer", "retained"):
            torch.testing.assert_close(after["state"][i][key], before["state"][i][key], rtol=0, atol=0,
                                       msg=f"{i} {key}")
    ctrl_a, ctrl_b = after["state"]["controller"], before["state"]["controller"]
    assert int(ctrl_a["skipped"]) == int(ctrl_b["skipped"]) + 1
    for key in ctrl_b:
        if key != "skipped":
            torch.testing.assert_close(ctrl_a[key], ctrl_b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def _params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def test_state_edits_take_effect_as_a_loaded_state_would():
    """``opt.state[p][key]`` edited in place or assigned (and a controller field) is used by the next step, as
    in torch.optim: the run equals one whose edited state went through ``load_state_dict``; reading the state
    without editing it leaves the trajectory bit-identical; an edit on a snapshot read before the last step
    warns and is used as it is."""
    x, y = readme_data(0)

    def fresh():
        model = readme_model(0)
        return model, EnhancedSGD(model.parameters(), lr=0.01, seed=3)

    def edit(opt, model):
        ps = list(model.parameters())
        opt.state[ps[0]]["momentum_buffer"].mul_(-3.0)        # in place
        opt.state[ps[2]]["retained"] = torch.ones_like(ps[2])  # assignment
        opt.state["controller"]["lr_scale"].fill_(0.5)        # a controller field

    ref_model, ref = fresh()
    run_torch(ref_model, ref, x, y, 3)
    a_model, a = fresh()
    run_torch(a_model, a, x, y, 3)
    for _ in range(2):  # reads only
        dict(a.state.items())
        a.state_dict()
    run_torch(a_model, a, x, y, 2)
    run_torch(ref_model, ref, x, y, 2)
    assert all(torch.equal(p, q) for p, q in zip(a_model.parameters(), ref_model.parameters()))

    b_model, b = fresh()
    run_torch(b_model, b, x, y, 3)
    c_model, c = fresh()
    run_torch(c_model, c, x, y, 3)
    edit(b, b_model)
    sd = c.state_dict()  # the same edit, through a state dict
    c2 = EnhancedSGD(c_model.parameters(), lr=0.01, seed=3)
    edit_target = copy.deepcopy(sd)
    edit_target["state"][0]["momentum_buffer"].mul_(-3.0)
    edit_target["state"][2]["retained"] = torch.ones_like(edit_target["state"][2]["retained"])
    edit_target["state"]["controller"]["lr_scale"].fill_(0.5)
    c2.load_state_dict(edit_target)
    run_torch(b_model, b, x, y, 3)
    run_torch(c_model, c2, x, y, 3)
    assert all(torch.equal(p, q) for p, q in zip(b_model.parameters(), c_model.parameters()))
    u_model, u = fresh()  # the same calls without the edit: the edit changed the run
    run_torch(u_model, u, x, y, 3)
    run_torch(u_model, u, x, y, 3)
    assert max((p - q).abs().max().item() for p, q in zip(b_model.parameters(), u_model.parameters())) > 1e-4

    held = b.state[next(b_model.parameters())]["momentum_buffer"]
    run_torch(b_model, b, x, y, 1)
    held.zero_()
    with pytest.warns(UserWarning, match="snapshot read before the last step"):
        run_torch(b_model, b, x, y, 1)
