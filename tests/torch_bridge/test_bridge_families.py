"""Bridge classes beyond SGD/Adam: Lookahead, ASGD, ADOPT specifics, and loss routing for entries that
need ``value``."""

import jax
import jax.numpy as jnp
import optax
import pytest
import torch

import torch_bridge as tb
from jaxopt_suite import _common as C


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def train(model, opt, steps, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g).to(dtype), torch.randn(64, 1, generator=g).to(dtype)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def same(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("inner", ["bridge", "torch"])
def test_lookahead_state_dict_and_resume(inner):
    def fresh(seed=0):
        model = make_model(seed)
        base = (tb.Adam(model.parameters(), lr=1e-2) if inner == "bridge"
                else torch.optim.Adam(model.parameters(), lr=1e-2))
        return model, tb.Lookahead(base, k=3, alpha=0.8)

    m_ref, o_ref = fresh()
    train(m_ref, o_ref, 10)
    m, o = fresh()
    train(m, o, 7)
    sd = o.state_dict()
    assert sd["param_groups"][0]["lookahead_step"] == 1 and sd["param_groups"][0]["k"] == 3
    assert {"slow_param", "exp_avg", "exp_avg_sq", "step"} <= set(sd["state"][0])
    m2, o2 = fresh(seed=5)
    m2.load_state_dict(m.state_dict())
    o2.load_state_dict(sd)
    train(m2, o2, 3)
    assert same(m_ref, m2)


def test_lookahead_validation_and_dispatch():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="Invalid alpha value"):
        tb.Lookahead(tb.SGD(p, lr=0.1), alpha=1.5)
    with pytest.raises(ValueError, match="Invalid k value"):
        tb.Lookahead(tb.SGD(p, lr=0.1), k=0)
    assert isinstance(tb.Lookahead(torch.optim.SGD(p, lr=0.1)), tb.TorchLookahead)
    assert isinstance(tb.Lookahead(tb.SGD(p, lr=0.1)), tb.Lookahead)


def test_lookahead_sync_pulls_fast_weights_to_slow():
    p = torch.nn.Parameter(torch.ones(4))
    opt = tb.Lookahead(tb.SGD([p], lr=0.1), k=2, alpha=0.8)
    for _ in range(2):
        opt.zero_grad()
        p.sum().backward()
        opt.step()
    # fast after two SGD steps: 1 - 0.2; sync: 1 + 0.8 * (0.8 - 1) = 0.84
    assert torch.allclose(p.detach(), torch.full((4,), 0.84), atol=1e-6)
    assert torch.equal(opt.state[p]["slow_param"], p.detach())


def test_asgd_averaged_context_and_state():
    model = make_model()
    opt = tb.ASGD(model.parameters(), lr=0.05, t0=2, lambd=1e-2)
    train(model, opt, 8)
    before = [p.detach().clone() for p in model.parameters()]
    ax = [opt.state[p]["ax"].clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(before, ax))
    with opt.averaged():
        assert all(torch.equal(p.detach(), a) for p, a in zip(model.parameters(), ax))
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    st = opt.state_dict()["state"][0]
    assert set(st) == {"step", "eta", "mu", "ax"} and st["eta"].dtype == torch.float32


def test_adopt_first_step_moves_nothing_and_fused_rejected():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = tb.ADOPT(model.parameters(), lr=1e-2, weight_decay=0.1, decouple=True)
    train(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    train(model, opt, 1)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(RuntimeError):
        tb.ADOPT(model.parameters(), fused=True)


def test_adopt_loads_torch_adopt_checkpoint():
    adopt = pytest.importorskip("adopt")
    with jax.enable_x64(True):
        m1, m2 = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
        o1 = adopt.ADOPT(m1.parameters(), lr=1e-2, foreach=False)
        train(m1, o1, 4, torch.float64)
        m2.load_state_dict(m1.state_dict())
        o2 = tb.ADOPT(m2.parameters(), lr=1e-2)
        o2.load_state_dict(o1.state_dict())
        train(m1, o1, 4, torch.float64)
        train(m2, o2, 4, torch.float64)
    assert max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters())) <= 1e-13


def value_scaled_sgd(learning_rate=0.1, *, segments=None):
    """Test factory: ``u = -lr * value * g`` (an update that needs the loss)."""

    def init_fn(params):
        return C.EmptyState()

    def update_fn(updates, state, params=None, *, value, grad_mask=None, **extra):
        out = jax.tree.map(lambda g: -learning_rate * value * g, updates)
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


value_scaled_sgd.requires_value = True


class ValueSGD(tb.JaxOptimizer):
    entry_name = value_scaled_sgd
    elementwise = True

    def __init__(self, params, lr=0.1):
        super().__init__(params, defaults={"lr": lr})

    def _hyperparams(self, group):
        return {"learning_rate": float(group["lr"])}

    def _static_config(self, group):
        return {}


def test_loss_is_routed_to_value():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ValueSGD([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()  # 3 at p = 1; grad 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss) == 3.0
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 0.1 * 3 * 2))
    opt.zero_grad()
    (p ** 2).sum().backward()
    opt.step(value=2.0)
    expect = (1 - 0.6) - 0.1 * 2.0 * 2 * (1 - 0.6)
    assert torch.allclose(p.detach(), torch.full((3,), expect))
    opt.zero_grad()
    (p ** 2).sum().backward()
    with pytest.raises(RuntimeError, match="needs the loss"):
        opt.step()


@pytest.mark.parametrize("make", [
    lambda ps: tb.Lookahead(tb.SGD(ps, lr=0.1, momentum=0.9), k=3, alpha=0.8),
    lambda ps: tb.ASGD(ps, lr=0.05, t0=2),
    lambda ps: tb.ADOPT(ps, lr=1e-2),
], ids=["lookahead", "asgd", "adopt"])
def test_pickled_copy_continues_identically(make):
    import pickle

    model = make_model()
    opt = make(model.parameters())
    train(model, opt, 4)
    clone = pickle.loads(pickle.dumps(opt))
    params = clone.param_groups[0]["params"]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)

    def loss_of(p):
        return ((torch.tanh(x @ p[0].t() + p[1]) @ p[2].t() + p[3] - y) ** 2).mean()

    for o, ps in ((opt, list(model.parameters())), (clone, params)):
        for _ in range(3):
            o.zero_grad()
            loss_of(ps).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    assert type(clone).__name__ in repr(clone)
