"""torch_bridge.AutoSGM: parity with the JAX transformation, torch API behaviour, state_dict resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxopt_suite.autosgm import autosgm_from_config
from tests import autosgm_support as S
from torch_bridge import AutoSGM

D = (0.9999, 0.999, 0.9, 0.0, 0.0, True)
CONFIGS = {
    "a_num_lrc3_cosine": dict(lr_cfg=(True, 1e-2, 3), beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True),
                              rc_cfg=(1, 0, 0, 2, 1, 1, 300, 1, 0), wd_cfg=(0.0, 1), eps_cfg=(1e-10,)),
    "heavy_ball": dict(lr_cfg=(False, 1e-2, 0), beta_cfg=(0.9999, 0.999, 0.9, 0.0, 1.0, False)),
    "d_parcor_full_poly": dict(lr_cfg=(True, 1e-2, 1), beta_cfg=(0.9999, 0.999, 0.9, 0.55, 0, True),
                               rc_cfg=(2, 0, 0.1, 1, 0, 1, 40, 1, 0), wd_cfg=(1e-3, 0)),
    "e_huber_parcor_exp": dict(lr_cfg=(True, 1e-2, 2), beta_cfg=(0.9999, 0.999, 0.9, 0.55, 0, True),
                               rc_cfg=(3, 0, 0, 0.5, 1, 1, 25, 1, 0), wd_cfg=(1e-2, 1)),
    "huberised_step": dict(lr_cfg=(True, 1e-3, 4), beta_cfg=D, eps_cfg=(1e-8,)),
}


FAST = {("a_num_lrc3_cosine", "f32"), ("a_num_lrc3_cosine", "f64"), ("heavy_ball", "f32"), ("huberised_step", "f64")}
BRIDGE_CASES = [
    pytest.param(name, dtype, id=f"{name}-{tag}", marks=() if (name, tag) in FAST else pytest.mark.slow)
    for name in CONFIGS for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64"))
]


@pytest.mark.parametrize("name, dtype", BRIDGE_CASES)
def test_bridge_matches_jax(name, dtype):
    cfg = CONFIGS[name]
    with S.x64_for(dtype):
        bridge, _ = S.run_torch(lambda p: AutoSGM(p, **cfg), 20, dtype)
    ours, _ = S.run_jax(autosgm_from_config(**cfg), 20, dtype)
    diff = S.max_abs_diff(bridge, ours)
    # float64: the same arithmetic; float32: the bridge traces its hyperparameters in float32
    assert diff <= (1e-6 if dtype == torch.float32 else 1e-13), diff


def _problem(dtype=torch.float32):
    x, y = S.data(dtype)
    return x, y, S.model(dtype), S.batches(20)


def test_live_lr_key_and_scheduler():
    x, y, net, batches = _problem()
    opt = AutoSGM(net.parameters(), lr_cfg=(False, 0.05, 0), beta_cfg=(0.9999, 0.999, 0.0, 0.0, 0.0, True))
    assert opt.param_groups[0]["lr"] == 0.05
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    w0 = net[0].bias.detach().clone()
    S.loss_and_grads(net, x, y, batches[0])
    g0 = net[0].bias.grad.detach().clone()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    torch.testing.assert_close(net[0].bias.detach(), w0 - 0.05 * g0)  # plain SGD (β_i = 0)
    w1 = net[0].bias.detach().clone()
    S.loss_and_grads(net, x, y, batches[1])
    g1 = net[0].bias.grad.detach().clone()
    opt.step()
    torch.testing.assert_close(net[0].bias.detach(), w1 - 0.025 * g1)


def test_closure_is_called_and_loss_returned():
    x, y, net, batches = _problem()
    opt = AutoSGM(net.parameters())
    calls = []

    def closure():
        calls.append(1)
        return S.loss_and_grads(net, x, y, batches[0])

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss) and loss.item() > 0


def test_per_group_configurations_match_separate_transforms():
    # one step: each group must equal its own configuration's transform (later steps mix the groups)
    dtype = torch.float64
    x, y = S.data(dtype)
    group2 = dict(lr_cfg=(True, 3e-3, 1), wd_cfg=(1e-2, 1), rc_cfg=(1, 0, 0, 2, 1, 1, 10, 1, 0))
    net = S.model(dtype)
    with S.x64_for(dtype):
        opt = AutoSGM([{"params": [net[0].weight, net[0].bias]},
                       {"params": [net[2].weight, net[2].bias], **group2}], lr_cfg=(True, 1e-2, 0))
        assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-3]
        S.loss_and_grads(net, x, y, S.batches(1)[0])
        opt.step()
    one_a, _ = S.run_jax(autosgm_from_config(lr_cfg=(True, 1e-2, 0)), 1, dtype)
    one_b, _ = S.run_jax(autosgm_from_config(**group2), 1, dtype)
    assert not np.allclose(one_a["2.weight"], one_b["2.weight"])
    for name, expected in (("0.weight", one_a), ("0.bias", one_a), ("2.weight", one_b), ("2.bias", one_b)):
        got = dict(net.named_parameters())[name].detach().numpy()
        np.testing.assert_allclose(got, expected[name], rtol=0, atol=1e-15, err_msg=name)


def test_numeric_entries_are_traced_and_structure_is_fixed():
    x, y, net, batches = _problem()
    opt = AutoSGM(net.parameters(), lr_cfg=(True, 1e-2, 0))
    S.loss_and_grads(net, x, y, batches[0])
    opt.step()
    opt.param_groups[0]["beta_cfg"] = (0.9999, 0.99, 0.5, 0.0, 0.0, True)  # numeric: takes effect
    opt.param_groups[0]["wd_cfg"] = (1e-3, 0)
    S.loss_and_grads(net, x, y, batches[1])
    opt.step()
    opt.param_groups[0]["lr_cfg"] = (True, 1e-2, 3)  # structural: refused
    S.loss_and_grads(net, x, y, batches[2])
    with pytest.raises(ValueError, match="num_lrc"):
        opt.step()


def test_skipped_parameter_keeps_state_and_step():
    x, y, net, batches = _problem()
    opt = AutoSGM(net.parameters(), lr_cfg=(True, 1e-2, 1))
    for k in range(3):
        S.loss_and_grads(net, x, y, batches[k])
        if k == 2:
            net[2].bias.grad = None
        opt.step()
    sd = opt.state_dict()["state"]
    assert int(sd[0]["step"]) == 3 and int(sd[3]["step"]) == 2
    bias_before = net[2].bias.detach().clone()
    S.loss_and_grads(net, x, y, batches[3])
    net[2].bias.grad = None
    opt.step()
    torch.testing.assert_close(net[2].bias.detach(), bias_before, rtol=0, atol=0)


def test_state_dict_tensor_only_and_resume(tmp_path):
    cfg = CONFIGS["e_huber_parcor_exp"]
    x, y = S.data(torch.float32)
    batches = S.batches(12)
    net = S.model(torch.float32)
    opt = AutoSGM(net.parameters(), **cfg)
    for idx in batches[:6]:
        S.loss_and_grads(net, x, y, idx)
        opt.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
    for idx in batches[6:]:
        S.loss_and_grads(net, x, y, idx)
        opt.step()
    expected = {k: v.detach().clone() for k, v in net.named_parameters()}

    ckpt = torch.load(path, weights_only=True)
    keys = set(ckpt["opt"]["state"][0])
    assert keys == {"step", "g_sm", "g_var", "pc", "wsq", "pcx", "lr_num"}
    net2 = S.model(torch.float32)
    net2.load_state_dict(ckpt["model"])
    opt2 = AutoSGM(net2.parameters(), **cfg)
    opt2.load_state_dict(ckpt["opt"])
    for idx in batches[6:]:
        S.loss_and_grads(net2, x, y, idx)
        opt2.step()
    for k, v in net2.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=0, atol=0)


def test_huber_state_keys():
    x, y, net, batches = _problem()
    opt = AutoSGM(net.parameters(), lr_cfg=(True, 1e-3, 4))
    S.loss_and_grads(net, x, y, batches[0])
    opt.step()
    st = opt.state_dict()["state"][0]
    assert {"cmag", "cvar"} <= set(st) and st["cmag"].dtype == torch.float32 and float(st["cmag"]) > 0


def test_suite_keywords_are_accepted():
    net = S.model(torch.float32)
    opt = AutoSGM(net.parameters(), lr=0.05, aoptlr=False, beta_i=0.9, eta_i=1.0, debias=False)
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["lr_cfg"] == (False, 0.05, 0)
    assert group["beta_cfg"] == (0.9999, 0.999, 0.9, 0.0, 1.0, False)
    with pytest.raises(TypeError, match="window"):
        AutoSGM(net.parameters(), window=None)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr_cfg=(4, 1e-3, 0)), ValueError, "num_lrc=4"),
    (dict(lr_cfg=(True, -1.0, 0)), ValueError, "learning_rate"),
    (dict(beta_cfg=(0.9999, 0.999, 0.5, 0.6, 0, True)), ValueError, "gamma_i"),
    (dict(rc_cfg=(9, 0, 0, 2, 1, 1, 100, 1, 0)), ValueError, "rcm"),
    (dict(wd_cfg=(1e-2, 2)), ValueError, "wd_level"),
    (dict(mix_cfg=(True, False, 1e-2, 0.95, 0)), NotImplementedError, "mix_cfg"),
])
def test_validation(kwargs, error, match):
    net = S.model(torch.float32)
    with pytest.raises(error, match=match):
        AutoSGM(net.parameters(), **kwargs)


def test_extra_eps_entries_warn():
    net = S.model(torch.float32)
    with pytest.warns(UserWarning, match="eps_cfg"):
        AutoSGM(net.parameters(), eps_cfg=(1e-10, True))


@pytest.mark.parametrize("cfg", [dict(lr_cfg=(True, 1e-2, 0), eps_cfg=(1e-8,)),
                                 dict(lr_cfg=(True, 1e-2, 1), beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True))],
                         ids=["adam_like", "parcor"])
def test_float16_zero_and_small_gradients(cfg):
    # issue 15.5: ε rounded to 0 in float16 made zero gradients NaN and 1e-3 gradients −inf
    for grad in (0.0, 1e-3):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float16))
        start = w.detach().clone()
        opt = AutoSGM([w], **cfg)
        for _ in range(3):
            w.grad = torch.full((6,), grad, dtype=torch.float16)
            opt.step()
        assert torch.isfinite(w).all()
        if grad == 0.0:
            assert torch.equal(w.detach(), start)
        else:  # bound as in tests/jaxopt_suite/test_autosgm.py::test_float16_small_gradients_stay_finite
            assert (w.detach().float() - start.float()).abs().max() <= 3 * (2 * 1e-2 * 1e-3 * 2**14) * (1 + 2**-10)
