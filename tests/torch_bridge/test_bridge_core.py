"""torch_bridge core: torch.optim parity, zero-copy, None grads, schedulers, state_dict, object behaviour."""

import copy
import pickle

import jax
import numpy as np
import pytest
import torch

import torch_bridge as tb
from torch_bridge import dlpack


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g).to(dtype), torch.randn(64, 1, generator=g).to(dtype)


def train(model, opt, steps, sched=None, dtype=torch.float32):
    x, y = data(dtype)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def max_diff(m1, m2):
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.01)),
    ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    ("SGD", dict(lr=0.05)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True, eps=1e-3)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True)),
]


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("name,kw", CASES)
def test_matches_torch_f64(x64, name, kw, flat):
    m1, m2 = make_model(torch.float64), make_model(torch.float64)
    o1 = getattr(torch.optim, name)(m1.parameters(), foreach=False, **kw)
    o2 = getattr(tb, name)(m2.parameters(), flat=flat, **kw)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, 30)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, 30)
    train(m1, o1, 30, s1, torch.float64)
    train(m2, o2, 30, s2, torch.float64)
    scale = max(1.0, max(p.abs().max().item() for p in m1.parameters()))  # maximize runs grow
    assert max_diff(m1, m2) <= 1e-12 * scale
    sd1, sd2 = o1.state_dict(), o2.state_dict()
    assert sd1["state"].keys() == sd2["state"].keys()
    for k in sd1["state"]:
        assert sd1["state"][k].keys() == sd2["state"][k].keys()
        for key, v in sd1["state"][k].items():
            assert torch.allclose(v, sd2["state"][k][key], atol=1e-12, rtol=1e-10), key


@pytest.mark.parametrize("name,kw", CASES[::3])
def test_matches_torch_f32(name, kw):
    m1, m2 = make_model(), make_model()
    o1 = getattr(torch.optim, name)(m1.parameters(), foreach=False, **kw)
    o2 = getattr(tb, name)(m2.parameters(), **kw)
    train(m1, o1, 30)
    train(m2, o2, 30)
    assert max_diff(m1, m2) <= 1e-5


def test_zero_copy_views_and_stable_pointers():
    model = make_model()
    ids = [id(p) for p in model.parameters()]
    opt = tb.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    buf = opt._runtime[0].buffers[0]
    assert buf.flat
    ptrs = [p.data_ptr() for p in model.parameters()]
    gptrs = [v.data_ptr() for v in buf.gviews]  # default zero_grad(): the fresh grads stay outside the buffer
    base = buf.flat_p.data_ptr()
    for p, off in zip(model.parameters(), buf.layout.offsets):
        assert p.data_ptr() == base + off * p.element_size()
    assert buf.jp[0].unsafe_buffer_pointer() == base
    assert buf.jg[0].unsafe_buffer_pointer() == buf.flat_g.data_ptr()
    scratch_ptrs = {buf.scratch[0].unsafe_buffer_pointer()}
    train(model, opt, 3)
    assert [id(p) for p in model.parameters()] == ids
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(g not in gptrs for g in (p.grad.data_ptr() for p in model.parameters()))  # fresh grads
    scratch_ptrs.add(buf.scratch[0].unsafe_buffer_pointer())
    # the donated scratch / state buffers rotate among a fixed set: no fresh output per step
    assert len(scratch_ptrs) <= 4
    # extra memory beyond params, grads and state: one flat scratch
    state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(buf.state))
    assert buf.nbytes() - state_bytes - buf.flat_p.nbytes - buf.flat_g.nbytes == buf.flat_p.nbytes


def test_aliasing_canary():
    t = torch.zeros(32)
    a = dlpack.to_jax(t, zero_copy=True)
    t[3] = 7.0
    assert float(a[3]) == 7.0


def test_float64_without_x64_raises():
    assert not jax.config.jax_enable_x64
    model = make_model(torch.float64)
    with pytest.raises(TypeError, match="jax_enable_x64"):
        tb.Adam(model.parameters())


@pytest.mark.parametrize("flat", [True, False])
def test_none_grad_skips_with_per_param_steps(x64, flat):
    torch.manual_seed(0)
    a1 = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    b1 = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    a2 = torch.nn.Parameter(a1.detach().clone())
    b2 = torch.nn.Parameter(b1.detach().clone())
    o1 = torch.optim.AdamW([a1, b1], lr=0.1, weight_decay=0.1, foreach=False)
    o2 = tb.AdamW([a2, b2], lr=0.1, weight_decay=0.1, flat=flat)
    for step in range(4):
        for a, b, o in ((a1, b1, o1), (a2, b2, o2)):
            o.zero_grad()
            loss = (a ** 2).sum() + (0 if step == 1 else (b ** 3).sum())
            loss.backward()
            o.step()
    assert torch.allclose(a1, a2, atol=1e-14, rtol=0) and torch.allclose(b1, b2, atol=1e-14, rtol=0)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert float(s2[0]["step"]) == 4 and float(s2[1]["step"]) == 3
    for k in (0, 1):
        for key in s1[k]:
            assert torch.allclose(s1[k][key], s2[k][key], atol=1e-14, rtol=0)


def test_never_stepped_and_frozen_params():
    model = make_model()
    frozen = model[0].bias
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = tb.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    train(model, opt, 3)
    assert torch.equal(frozen.detach(), before)
    state = opt.state_dict()["state"]
    assert 1 not in state and 0 in state


def test_set_to_none_false_keeps_stepping_zero_grads(x64):
    p1 = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    o1 = torch.optim.SGD([p1], lr=0.1, momentum=0.9, weight_decay=0.1, foreach=False)
    o2 = tb.SGD([p2], lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in range(3):
        for p, o in ((p1, o1), (p2, o2)):
            o.zero_grad(set_to_none=False)
            if step == 0:
                (p ** 2).sum().backward()
            o.step()
    assert torch.allclose(p1, p2, atol=1e-15, rtol=0)


def test_replaced_grad_and_model_zero_grad(x64):
    m1, m2 = make_model(torch.float64), make_model(torch.float64)
    o1 = torch.optim.Adam(m1.parameters(), lr=1e-2, foreach=False)
    o2 = tb.Adam(m2.parameters(), lr=1e-2)
    x, y = data(torch.float64)
    for _ in range(4):
        for m, o in ((m1, o1), (m2, o2)):
            m.zero_grad()  # sets .grad to None behind the optimizer's back
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    assert max_diff(m1, m2) <= 1e-13
    buf = o2._runtime[0].buffers[0]
    # the fresh .grad tensors of the last backward were copied into the flat buffer and left where they are
    # (model.zero_grad() drops them: moving them onto the buffer would be wasted work)
    assert all(torch.equal(p.grad, v) and p.grad.data_ptr() != v.data_ptr()
               for p, v in zip(m2.parameters(), buf.gviews))


def count_compiles(fn):
    before = tb.compiled_step_cache_size()
    fn()
    return tb.compiled_step_cache_size() - before


def test_schedulers_do_not_recompile():
    model = make_model()
    opt = tb.Adam(model.parameters(), lr=torch.tensor(0.01), betas=(0.9, 0.99))
    onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=60, cycle_momentum=True)
    assert count_compiles(lambda: train(model, opt, 1)) <= 1
    betas_seen = set()

    def run():
        for _ in range(58):
            train(model, opt, 1)
            onecycle.step()
            betas_seen.add(opt.param_groups[0]["betas"][0])

    assert count_compiles(run) == 0
    assert len(betas_seen) > 10
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e))

    def run2():
        for i in range(20):
            train(model, opt, 1)
            plateau.step(1.0)
            lam.step()

    assert count_compiles(run2) == 0


def test_sgd_onecycle_momentum_no_recompile():
    model = make_model()
    opt = tb.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=30, cycle_momentum=True)
    train(model, opt, 1)
    sched.step()

    def run():
        for _ in range(20):
            train(model, opt, 1)
            sched.step()

    assert count_compiles(run) == 0


def test_torch_state_dict_round_trip(x64):
    m1, m2 = make_model(torch.float64), make_model(torch.float64)
    o1 = torch.optim.Adam(m1.parameters(), lr=1e-2, amsgrad=True, foreach=False)
    train(m1, o1, 5, dtype=torch.float64)
    m2.load_state_dict(m1.state_dict())
    o2 = tb.Adam(m2.parameters(), lr=1e-2, amsgrad=True)
    o2.load_state_dict(o1.state_dict())
    train(m1, o1, 5, dtype=torch.float64)
    train(m2, o2, 5, dtype=torch.float64)
    assert max_diff(m1, m2) <= 1e-13
    # and back into torch
    m3 = make_model(torch.float64)
    m3.load_state_dict(m2.state_dict())
    o3 = torch.optim.Adam(m3.parameters(), lr=1e-2, amsgrad=True, foreach=False)
    o3.load_state_dict(o2.state_dict())
    assert o3.state_dict()["state"][0]["step"].dtype == torch.float32
    train(m3, o3, 3, dtype=torch.float64)
    train(m2, o2, 3, dtype=torch.float64)
    assert max_diff(m2, m3) <= 1e-13


@pytest.mark.parametrize("flat", [True, False])
def test_state_dict_round_trip_with_per_param_steps(x64, flat):
    """torch -> bridge -> torch with different step counts per parameter (b skipped once)."""
    torch.manual_seed(0)
    start = [torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    params = [[torch.nn.Parameter(t.clone()) for t in start] for _ in range(3)]

    def run(opt, pair, steps, skip_b=()):
        a, b = pair
        for step in range(steps):
            opt.zero_grad()
            loss = (a ** 2).sum() + (0 if step in skip_b else (b ** 3).sum())
            loss.backward()
            opt.step()

    ref = torch.optim.Adam(params[0], lr=0.1, weight_decay=0.1, foreach=False)
    run(ref, params[0], 3, skip_b=(1,))
    with torch.no_grad():
        for p, q in zip(params[1], params[0]):
            p.copy_(q)
    ours = tb.Adam(params[1], lr=0.1, weight_decay=0.1, flat=flat)
    ours.load_state_dict(ref.state_dict())
    run(ref, params[0], 2)
    run(ours, params[1], 2)
    for p, q in zip(params[0], params[1]):
        assert torch.allclose(p, q, atol=1e-14, rtol=0)
    assert [float(s["step"]) for s in ours.state_dict()["state"].values()] == [5.0, 4.0]
    back = torch.optim.Adam(params[2], lr=0.1, weight_decay=0.1, foreach=False)
    with torch.no_grad():
        for p, q in zip(params[2], params[1]):
            p.copy_(q)
    back.load_state_dict(ours.state_dict())
    run(ref, params[0], 2)
    run(back, params[2], 2)
    for p, q in zip(params[0], params[2]):
        assert torch.allclose(p, q, atol=1e-14, rtol=0)


def test_load_rejects_wrong_shapes():
    m1 = make_model()
    o1 = torch.optim.Adam(m1.parameters())
    train(m1, o1, 1)
    sd = o1.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(3)
    m2 = make_model()
    o2 = tb.Adam(m2.parameters())
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(shape \(16, 8\)\): state 'exp_avg' "
                                         r"has shape \(3,\)"):
        o2.load_state_dict(sd)  # at load, not at the next step


def test_save_resume_bitwise(tmp_path):
    def fresh():
        model = make_model()
        opt = tb.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)

    m_ref, o_ref, s_ref = fresh()
    train(m_ref, o_ref, 10, s_ref)
    m, o, s = fresh()
    train(m, o, 6, s)
    torch.save({"m": m.state_dict(), "o": o.state_dict(), "s": s.state_dict()}, tmp_path / "ck.pt")
    m2, o2, s2 = fresh()
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m2.load_state_dict(ck["m"])
    o2.load_state_dict(ck["o"])
    s2.load_state_dict(ck["s"])
    train(m2, o2, 4, s2)
    for a, b in zip(m_ref.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_closure_value_hooks_and_add_param_group():
    model = make_model()
    opt = tb.SGD(model[0].parameters(), lr=0.1)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.0})
    frozen = [p.detach().clone() for p in model[2].parameters()]
    order = []
    opt.register_step_pre_hook(lambda o, a, k: order.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: order.append("post"))
    x, y = data()

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and order == ["pre", "post"]
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[2].parameters()))
    assert opt.param_groups[1]["momentum"] == 0 and "SGD" in repr(opt)


def test_simple_path_for_unaligned_and_noncontiguous(x64):
    base = torch.randn(40, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64).t())  # non-contiguous
    v = base[1:9]  # unaligned view
    v.requires_grad_(True)
    ref_w = torch.nn.Parameter(w.detach().clone())
    ref_v = torch.nn.Parameter(v.detach().clone())
    o1 = torch.optim.Adam([ref_w, ref_v], lr=0.1, foreach=False)
    o2 = tb.Adam([w, v], lr=0.1)
    for _ in range(3):
        for a, b, o in ((ref_w, ref_v, o1), (w, v, o2)):
            o.zero_grad()
            ((a ** 2).sum() + (b.sin()).sum()).backward()
            o.step()
    assert not o2._runtime[0].buffers[0].flat
    assert torch.allclose(ref_w, w, atol=1e-14) and torch.allclose(ref_v, v, atol=1e-14)
    assert torch.equal(base[9:], base[9:])  # storage around the view untouched by the step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_follow_torch(dtype):
    m1, m2 = make_model(dtype), make_model(dtype)
    o1 = torch.optim.Adam(m1.parameters(), lr=1e-2, eps=1e-3, foreach=False)
    o2 = tb.Adam(m2.parameters(), lr=1e-2, eps=1e-3)
    train(m1, o1, 5, dtype=dtype)
    train(m2, o2, 5, dtype=dtype)
    scale = max(p.abs().max().item() for p in m1.parameters())
    assert max_diff(m1, m2) <= 2e-2 * scale
    assert all(p.dtype == dtype for p in m2.parameters())


def test_deepcopy_and_pickle_keep_state():
    model = make_model()
    opt = tb.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 3)
    clone = copy.deepcopy(opt)
    restored = pickle.loads(pickle.dumps(opt))
    for o in (clone, restored):
        assert o.state_dict()["state"][0]["step"] == 3
        assert o.param_groups[0]["lr"] == 1e-2
    # the copy trains its own (copied) params exactly like the original
    params = clone.param_groups[0]["params"]
    x, y = data()

    def loss_of(ps):
        h = torch.tanh(x @ ps[0].t() + ps[1])
        return (((h @ ps[2].t() + ps[3]) - y) ** 2).mean()

    for o, ps in ((opt, list(model.parameters())), (clone, params)):
        o.zero_grad()
        loss_of(ps).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))


def test_grad_scaler_skips_inf_steps():
    model = make_model()
    opt = tb.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    x, y = data()
    opt.zero_grad()
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 8.0
    assert float(opt.state_dict()["state"][0]["step"]) == 1


def test_validation_messages():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        tb.Adam(p, lr=-1)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        tb.AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        tb.SGD(p, nesterov=True)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        tb.Adam(p, lr=torch.ones(2))
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        tb.Adam(p, fused=True, foreach=True)


def test_generic_jax_optimizer_matches_subclass():
    m1, m2 = make_model(), make_model()
    o1 = tb.JaxOptimizer(m1.parameters(), "adam", lr=1e-2, b2=0.99, weight_decay=0.1)
    o2 = tb.Adam(m2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    train(m1, o1, 5)
    train(m2, o2, 5)
    assert max_diff(m1, m2) <= 1e-6


def test_storage_replaced_after_construction_is_readopted():
    m1, m2 = make_model(), make_model()
    o1 = torch.optim.Adam(m1.parameters(), lr=1e-2, foreach=False)
    o2 = tb.Adam(m2.parameters(), lr=1e-2)
    train(m1, o1, 2)
    train(m2, o2, 2)
    with torch.no_grad():
        for m in (m1, m2):
            m[0].weight.data = m[0].weight.detach().clone()  # same shape/dtype, new storage
    train(m1, o1, 2)
    train(m2, o2, 2)
    assert max_diff(m1, m2) <= 1e-6
    buf = o2._runtime[0].buffers[0]
    assert m2[0].weight.data_ptr() == buf.flat_p.data_ptr()
    m2.double()  # dtype change: the group is re-adopted with its state cast (needs x64 for float64)
    with jax.enable_x64(True), pytest.warns(UserWarning, match="re-adopting"):
        train(m2, o2, 1, dtype=torch.float64)
    assert o2.state_dict()["state"][0]["exp_avg"].dtype == torch.float64


def test_swap_write_back_matches_copy_and_reuses_two_buffers():
    m1, m2 = make_model(), make_model()
    o1 = tb.Adam(m1.parameters(), lr=1e-2)
    o2 = tb.Adam(m2.parameters(), lr=1e-2, write_back="swap")
    train(m1, o1, 3)
    train(m2, o2, 3)
    buf = o2._runtime[0].buffers[0]
    ptrs = set()
    for _ in range(4):
        train(m1, o1, 1)
        train(m2, o2, 1)
        ptrs.add(m2[0].weight.data_ptr())
        assert m2[0].weight.data_ptr() == buf.jp[0].unsafe_buffer_pointer()
    assert max_diff(m1, m2) == 0.0
    assert len(ptrs) == 2  # the two parameter buffers alternate: donation reuses them, no allocation
    sd = o2.state_dict()
    m3 = make_model()
    m3.load_state_dict(m2.state_dict())
    o3 = tb.Adam(m3.parameters(), lr=1e-2)
    o3.load_state_dict(sd)
    train(m2, o2, 2)
    train(m3, o3, 2)
    assert max_diff(m2, m3) == 0.0
