"""torch_bridge.ELRA: the package's API and behaviour, its defects fixed, parity with JAX and the package."""

from __future__ import annotations

import contextlib
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxopt_suite.elra import elra, elra_step  # noqa: E402
from torch_bridge import ELRA, ElraGradScaler, ElraOptimizer  # noqa: E402


@pytest.fixture(autouse=True)
def _x64_and_cwd(tmp_path, monkeypatch):
    """x64 for the control arithmetic; every test runs in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    with jax.enable_x64(True):
        yield


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def sine_setup(seed=0):
    torch.manual_seed(seed)
    x = torch.linspace(-math.pi, math.pi, 2000)
    xx = x.unsqueeze(-1).pow(torch.tensor([1, 2, 3]))
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0, 1))
    y = torch.sin(x)

    def loss_fn():
        return ((model(xx) - y) ** 2).sum()

    return model, loss_fn


def sine_steps(opt, loss_fn, n):
    """``n`` ordinary ELRA calls (zero_grad, backward, step with the loss); returns the last loss."""
    for _ in range(n):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss)
    return loss


def digits_batches(epochs=1, batch=64, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.from_numpy((d.data / 16.0).astype(np.float32))
    Y = torch.from_numpy(d.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for s in range(0, len(X), batch):
            idx = torch.from_numpy(order[s:s + batch])
            yield X[idx], Y[idx]


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train_digits(opt_factory, *, calls, step=None, seed=0):
    model = mlp(seed)
    opt = opt_factory(model)
    lf = torch.nn.CrossEntropyLoss()
    losses = []
    for i, (X, Y) in enumerate(digits_batches(epochs=10, seed=seed)):
        if i >= calls:
            break
        opt.zero_grad()
        loss = lf(model(X), Y)
        loss.backward()
        (step or (lambda o, l: o.step(l)))(opt, loss)
        losses.append(loss.item())
    return model, opt, losses


# ----------------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------------


def test_bridge_matches_the_package_on_digits_dnn():
    ref_mod = pytest.importorskip("elra")
    with quiet():
        m_ref, _, l_ref = train_digits(lambda m: ref_mod.ElraOptimizer(m.parameters(), classes=10, batch_size=64),
                                       calls=60, step=lambda o, l: o.step(l.item()))
    m_our, _, l_our = train_digits(lambda m: ELRA(m.parameters(), classes=10, batch_size=64), calls=60)
    np.testing.assert_allclose(l_our, l_ref, rtol=1e-4)
    ref, ours = flat_params(m_ref), flat_params(m_our)
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_bridge_matches_pure_jax_call_for_call():
    """The bridge's inputs of every call replayed through elra_step (per-tensor leaves)."""
    model, loss_fn = sine_setup()
    opt = ELRA(model.parameters(), lr=1e-6)
    kw = dict(learning_rate=1e-6)
    params = [jnp.asarray(p.detach().numpy()) for p in model.parameters()]
    state = elra(**kw).init(params)
    step = jax.jit(lambda g, s, p, v: elra_step(g, s, p, value=v, **kw))
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        x_in = [jnp.asarray(p.detach().numpy().copy()) for p in model.parameters()]
        g_in = [jnp.asarray(p.grad.numpy().copy()) for p in model.parameters()]
        opt.step(loss)
        x_jax, state = step(g_in, state, x_in, loss.item())
        ours = flat_params(model).numpy()
        ref = np.concatenate([np.asarray(x).reshape(-1) for x in x_jax])
        # same arithmetic except the summation order of the global reductions (one padded flat buffer)
        assert np.max(np.abs(ours - ref)) <= 1e-5 * np.max(np.abs(ref))
        sd = opt.state_dict()["state"]["elra"]
        assert sd["last_retrace"].item() == bool(state.last_retrace)
        assert sd["retrace2"].item() == int(state.retrace2)
    assert int(state.step_cnt) == 40


# ----------------------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------------------


def test_loss_forms_closure_value_and_tensor_agree():
    def run(mode):
        model, loss_fn = sine_setup()
        opt = ElraOptimizer(model.parameters(), None, 8, 0, lr=1e-6)
        for _ in range(15):
            if mode == "closure":
                def closure():
                    opt.zero_grad()
                    loss = loss_fn()
                    loss.backward()
                    return loss
                out = opt.step(closure)
                assert torch.is_tensor(out)
                continue
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            if mode == "float":
                opt.step(loss.item())
            elif mode == "tensor":
                opt.step(loss)
            else:
                opt.step(value=loss.detach())
        return flat_params(model)

    base = run("float")
    for mode in ("tensor", "value", "closure"):
        assert torch.equal(run(mode), base), mode


def test_bad_arguments_raise():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="learning_rate"):
        ELRA(p, lr=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        ELRA(p, weight_decay=0.3)
    opt = ELRA(p)
    with pytest.raises(ValueError, match="positive loss"):
        opt.step(-1.0)
    with pytest.raises(TypeError, match="loss"):
        opt.step()
    with pytest.raises(ValueError, match="per-group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "weight_decay": 0.1})
    for name in ("step_allinone", "set_param", "get_boost_future", "set_lgs_device"):
        with pytest.raises(NotImplementedError):
            getattr(opt, name)()


def test_step_noscale_with_flat_gradient_and_get_gradient():
    def run(use_noscale):
        model, loss_fn = sine_setup()
        opt = ELRA(model.parameters(), lr=1e-6)
        for _ in range(10):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            if use_noscale:
                g = opt.get_gradient().clone()
                opt.zero_grad()
                opt.step_noscale(loss.item(), g)
            else:
                opt.step(loss.item())
        return flat_params(model)

    assert torch.equal(run(True), run(False))


def test_step_retrace_returns_to_last_good_point():
    model, loss_fn = sine_setup()
    opt = ELRA(model.parameters(), lr=1e-6)
    sine_steps(opt, loss_fn, 5)
    sd = opt.state_dict()
    before = sd["state"]["elra"]["retrace2"].item()
    opt.step_retrace(loss_fn().item())
    sd2 = opt.state_dict()
    assert sd2["state"]["elra"]["retrace2"].item() == before + 1
    alpha = sd2["state"]["elra"]["alpha"].item()
    for i, p in enumerate(model.parameters()):
        expected = sd["state"][i]["x_lastgood"] - alpha * sd["state"][i]["g_old"]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-8)


def test_check_next_step_and_get_param():
    model, loss_fn = sine_setup()
    opt = ELRA(model.parameters(), lr=1e-6, classes=10, batch_size=2000)
    assert opt.check_next_step() == (True, 0)
    opt.zero_grad()
    loss_fn().backward()
    opt.step(loss_fn())
    assert opt.check_next_step() == (True, 1)
    flat = opt.get_param(only_new=True)
    torch.testing.assert_close(flat, flat_params(model))
    assert opt.get_param(only_new=True) is None
    assert opt.get_param(only_new=False) is not None


# ----------------------------------------------------------------------------------------------------------
# defects of the package, fixed (each shows the package's failure)
# ----------------------------------------------------------------------------------------------------------


def test_no_files_are_written_and_nothing_printed(tmp_path, capsys):
    ref_mod = pytest.importorskip("elra")
    model, loss_fn = sine_setup()
    opt = ELRA(model.parameters(), lr=1e-6)
    for _ in range(101):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss)
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr().out == ""

    model, loss_fn = sine_setup()
    ref = ref_mod.ElraOptimizer(model.parameters(), lr=1e-6)
    for _ in range(101):
        ref.zero_grad()
        loss = loss_fn()
        loss.backward()
        ref.step(loss.item())
    assert "state_lgs.txt" in os.listdir(tmp_path)
    assert capsys.readouterr().out != ""


def test_lr_scheduler_runs_and_changes_nothing():
    ref_mod = pytest.importorskip("elra")

    def run(with_scheduler):
        model, loss_fn = sine_setup()
        opt = ELRA(model.parameters(), lr=1e-6)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1) if with_scheduler else None
        for _ in range(12):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step(loss)
            if sched:
                sched.step()
        return flat_params(model)

    assert torch.equal(run(True), run(False))
    with quiet():
        model, _ = sine_setup()
        ref = ref_mod.ElraOptimizer(model.parameters(), lr=1e-6)
        with pytest.raises(KeyError, match="lr"):
            torch.optim.lr_scheduler.StepLR(ref, step_size=3)


def test_parameter_without_gradient_takes_part_with_zero_gradient():
    ref_mod = pytest.importorskip("elra")

    def build():
        torch.manual_seed(0)
        used = torch.nn.Parameter(torch.tensor([0.3, 0.8]))
        unused = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        return used, unused

    used, unused = build()
    opt = ELRA([used, unused], lr=1e-3, weight_decay=0.01)
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        f = (1 - used[0]) ** 2 + 100 * (used[1] - used[0] ** 2) ** 2
        f.backward()
        opt.step(f)
    assert torch.isfinite(used).all() and torch.isfinite(unused).all()
    assert not torch.equal(unused.detach(), torch.tensor([1.0, -1.0]))  # weight decay reaches it

    with quiet():
        used, unused = build()
        ref = ref_mod.ElraOptimizer([used, unused], lr=1e-3)
        f = (1 - used[0]) ** 2 + 100 * (used[1] - used[0] ** 2) ** 2
        f.backward()
        with pytest.raises(AttributeError):
            ref.step(f.item())


def test_add_param_group_after_training_started():
    ref_mod = pytest.importorskip("elra")
    model, loss_fn = sine_setup()
    extra = torch.nn.Parameter(torch.tensor([0.5]))
    opt = ELRA(model.parameters(), lr=1e-6)

    def loss_with_extra():
        return loss_fn() + (extra[0] - 2.0) ** 2 * 100

    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss)
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
    sd = opt.state_dict()
    assert sd["state"]["elra"]["step_cnt"].item() == 100
    for _ in range(60):
        opt.zero_grad()
        loss = loss_with_extra()
        loss.backward()
        opt.step(loss)
    assert abs(extra.item() - 2.0) < 0.05
    assert opt.state_dict()["state"]["elra"]["step_cnt"].item() == 160

    with quiet():
        model, loss_fn = sine_setup()
        ref = ref_mod.ElraOptimizer(model.parameters(), lr=1e-6)
        ref.zero_grad()
        loss = loss_fn()
        loss.backward()
        ref.step(loss.item())
        with pytest.raises(AssertionError):
            ref.add_param_group({"params": [torch.nn.Parameter(torch.tensor([0.5]))]})


def test_state_dict_resume_is_bit_identical():
    ref_mod = pytest.importorskip("elra")
    make = lambda m: ELRA(m.parameters(), classes=10, batch_size=64, momentum=0.5,  # noqa: E731
                          weight_decay=0.9999)
    model_a, opt_a, _ = train_digits(make, calls=30)
    sd = opt_a.state_dict()
    assert sd["state"]["elra"]["alpha"].dtype == torch.float64
    assert set(sd["state"][0]) >= {"x_lastgood", "g_old", "momentum"}
    model_b = mlp()
    model_b.load_state_dict(model_a.state_dict())
    opt_b = make(model_b)
    opt_b.load_state_dict(sd)
    lf = torch.nn.CrossEntropyLoss()
    batches = list(digits_batches(epochs=2, seed=1))[:30]
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        for X, Y in batches:
            opt.zero_grad()
            loss = lf(model(X), Y)
            loss.backward()
            opt.step(loss)
    assert torch.equal(flat_params(model_a), flat_params(model_b))

    with quiet():
        ref = ref_mod.ElraOptimizer(mlp().parameters())
        with pytest.raises((NotImplementedError, KeyError)):
            ref.load_state_dict(ref.state_dict())


def test_kept_state_dict_is_a_snapshot():
    # issue 15.5: a later state_dict() rewrote the kept per-parameter entries in place while the scalars under
    # 'elra' stayed old, so the kept dict mixed two points of training
    import copy

    model, loss_fn = sine_setup()
    opt = ELRA(model.parameters(), lr=1e-5)
    sine_steps(opt, loss_fn, 3)
    kept = opt.state_dict()
    frozen = copy.deepcopy(kept)
    sine_steps(opt, loss_fn, 3)
    later = opt.state_dict()
    assert not torch.equal(later["state"][0]["g_old"], frozen["state"][0]["g_old"])  # training moved on
    for key, entry in frozen["state"].items():
        assert set(kept["state"][key]) == set(entry)
        for name, value in entry.items():
            # equal_nan: the unset train/valid losses are NaN
            torch.testing.assert_close(kept["state"][key][name], value, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{key} {name}")
    # the kept snapshot loads as the state it was taken at
    model_b, _ = sine_setup()
    opt_b = ELRA(model_b.parameters(), lr=1e-5)
    opt_b.load_state_dict(kept)
    reloaded = opt_b.state_dict()
    for key, entry in frozen["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(reloaded["state"][key][name], value, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{key} {name}")


def test_nan_gradient_is_a_retrace_in_the_bridge():
    model, loss_fn = sine_setup()
    opt = ELRA(model.parameters(), lr=1e-6)
    for i in range(12):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if i == 6:
            next(model.parameters()).grad.fill_(float("nan"))
        opt.step(loss)
    assert torch.isfinite(flat_params(model)).all()
    assert opt.state_dict()["state"]["elra"]["retrace3"].item() >= 1


def test_first_nan_loss_is_ignored():
    model, loss_fn = sine_setup()
    opt = ELRA(model.parameters(), lr=1e-6)
    before = flat_params(model)
    opt.zero_grad()
    loss_fn().backward()
    opt.step(float("nan"))
    assert torch.equal(flat_params(model), before)
    assert opt.state_dict()["state"]["elra"]["skipped"].item() == 1


# ----------------------------------------------------------------------------------------------------------
# GradScaler, booster
# ----------------------------------------------------------------------------------------------------------


def test_grad_scalers_give_the_plain_trajectory():
    def run(kind):
        model, loss_fn = sine_setup()
        opt = ELRA(model.parameters(), lr=1e-6)
        scaler = {"torch": torch.amp.GradScaler("cpu", init_scale=2.0**10),
                  "elra": ElraGradScaler(init_scale=2.0**10, loss_limit=1e9, device="cpu")}.get(kind)
        for _ in range(15):
            opt.zero_grad()
            loss = loss_fn()
            if scaler is None:
                loss.backward()
                opt.step(loss)
            else:
                scaler.scale(loss).backward()
                if kind == "torch":
                    scaler.step(opt, value=loss.detach())
                else:
                    scaler.step(opt)
                scaler.update()
        return flat_params(model)

    base = run("plain")
    assert torch.equal(run("torch"), base)
    assert torch.equal(run("elra"), base)


def test_elra_grad_scaler_honours_loss_limit():
    """A loss at or above ``loss_limit`` is a forced retrace (here: the ignored first call, repeatedly)."""
    model, loss_fn = sine_setup()
    before = flat_params(model)
    opt = ELRA(model.parameters(), lr=1e-6)
    scaler = ElraGradScaler(init_scale=1.0, loss_limit=1e3, device="cpu")  # initial loss ~7e4
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(loss_fn()).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.state_dict()["state"]["elra"]["skipped"].item() == 3
    assert torch.equal(flat_params(model), before)


def test_booster_returns_averaged_model():
    model = mlp()
    opt = ELRA(model.parameters(), classes=10, batch_size=64)
    assert opt.get_boost_model(True, model) == (0, 0.0, None)
    lf = torch.nn.CrossEntropyLoss()
    for epoch in range(2):
        for X, Y in list(digits_batches(epochs=1, seed=epoch)):
            opt.zero_grad()
            loss = lf(model(X), Y)
            loss.backward()
            opt.step(loss)
        count, avg_loss, boosted = opt.get_boost_model(True, model)
        assert count == 29 and boosted is not None and avg_loss > 0
        assert boosted is opt.get_boost_model_prev()
        diff = flat_params(boosted) - flat_params(model)
        assert 0 < float(diff.abs().max()) < 1.0
    assert opt.get_boost_model(False) == (0, 0.0, None)


def test_step_compiles_once():
    """Every input of the jitted step is committed to the device from the first call on.

    jit's cache key includes whether each argument is committed; the fresh state, the scratch buffers and the
    outputs of the previous call used to differ in that, which compiled the step three times.
    """
    from torch_bridge import elra as bridge_elra

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.ReLU(), torch.nn.Linear(13, 3))  # unique shapes
    opt = ELRA(model.parameters(), classes=10, batch_size=8)
    x, y = torch.randn(32, 7), torch.randn(32, 3)
    before = bridge_elra._bridge_step._cache_size()
    for i in range(6):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss)
        if i == 3:
            assert opt.get_param(only_new=False) is not None  # resets the "changed" flag
    assert bridge_elra._bridge_step._cache_size() - before == 1


def test_state_reads_are_current_and_edits_take_effect_as_a_loaded_state_would():
    """``opt.state`` shows the current point on read (as torch.optim's), reading it leaves the run
    bit-identical, an in-place edit or assignment is used by the next call exactly as the same edit loaded
    through ``load_state_dict``, and an edit on a snapshot read before the last step warns."""
    import copy
    import warnings

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))

    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 2)
        return m, ELRA(m.parameters(), lr=0.01)

    def run(m, o, n):
        for _ in range(n):
            def closure():
                o.zero_grad()
                loss = m(x).pow(2).sum()
                loss.backward()
                return loss
            o.step(closure)

    def diff(a, b):
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ELRA's float32 notice
        (m1, o1), (m2, o2), (m3, o3), (m4, o4) = make(), make(), make(), make()
    for m, o in ((m1, o1), (m2, o2), (m3, o3), (m4, o4)):
        run(m, o, 3)
    w = next(m2.parameters())
    assert set(o2.state[w]) >= {"x_lastgood", "g_old"} and "lr" in o2.state["elra"]
    assert torch.equal(o2.state[w]["g_old"], o2.state_dict()["state"][0]["g_old"])
    dict(o1.state.items())  # reads only
    o1.state_dict()
    o2.state[w]["g_old"].mul_(-5.0)  # in place
    o2.state["elra"]["lr"] = o2.state["elra"]["lr"] * 0.5  # assignment
    sd = copy.deepcopy(o4.state_dict())
    sd["state"][0]["g_old"].mul_(-5.0)
    sd["state"]["elra"]["lr"] = sd["state"]["elra"]["lr"] * 0.5
    o4.load_state_dict(sd)
    for m, o in ((m1, o1), (m2, o2), (m3, o3), (m4, o4)):
        run(m, o, 3)
    assert diff(m1, m3) == 0.0
    assert diff(m2, m4) == 0.0
    assert diff(m2, m3) > 1e-3  # the edit changed the run
    held = o2.state[w]["g_old"]
    run(m2, o2, 1)
    held.zero_()
    with pytest.warns(UserWarning, match="snapshot read before the last step"):
        run(m2, o2, 1)
