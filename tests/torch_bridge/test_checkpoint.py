"""Optimizer state between PyTorch and JAX (``torch_bridge.checkpoint``, ``jaxopt_suite.checkpoint``).

The exact-resume trajectories and state round trips of every registry entry are parity rows
(``parity/cases_resume.py``, run by ``tests/parity/test_parity.py``); these tests cover the API around
them: ``torch.optim`` and ``optax`` sources, the Linear/Conv layout transforms, ``torch.save`` files,
the parameter helpers and the error messages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxopt_suite as js
import torch_bridge
from jaxopt_suite import registry
from jaxopt_suite.checkpoint import ParamMapping, default_mapping, leaf_paths
from parity import cases_resume
from torch_bridge import checkpoint as ck

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RNG = np.random.default_rng(0)
# a 3-4-1 tanh MLP: torch layout (out, in) in torch order w1, b1, w2, b2; Flax dict with (in, out) kernels
W1, B1, W2, B2 = (RNG.standard_normal(s).astype(np.float32) * 0.5 for s in ((4, 3), (4,), (1, 4), (1,)))
X = RNG.standard_normal((8, 3)).astype(np.float32)
Y = np.sin(X.sum(axis=1, keepdims=True)).astype(np.float32)
MAPPING = ParamMapping.from_pairs([("w1", (1, 0)), ("b1", None), ("w2", (1, 0)), ("b2", None)])


def torch_params():
    return [torch.tensor(a).requires_grad_(True) for a in (W1, B1, W2, B2)]


def flax_like(tparams):
    w1, b1, w2, b2 = (jnp.asarray(p.detach().numpy()) for p in tparams)
    return {"w1": w1.T, "b1": b1, "w2": w2.T, "b2": b2}


def torch_loss(ps):
    w1, b1, w2, b2 = ps
    return torch.mean((torch.tanh(torch.tensor(X) @ w1.T + b1) @ w2.T + b2 - torch.tensor(Y)) ** 2)


def jax_loss(p):
    return jnp.mean((jnp.tanh(X @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - Y) ** 2)


def torch_steps(opt, ps, n, *, value=False):
    for _ in range(n):
        opt.zero_grad()
        loss = torch_loss(ps)
        loss.backward()
        if value:
            opt.step(value=float(loss.detach()))
        else:
            opt.step()


def jax_steps(tx, state, params, n, *, value=False):
    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(jax_loss)(params)
        updates, state = tx.update(grads, state, params, **({"value": loss} if value else {}))
        return optax.apply_updates(params, updates), state

    for _ in range(n):
        params, state = step(params, state)
    return params, state


def assert_states_equal(a, b, *, rtol=0.0, where="state"):
    """Recursive equality of two ``state_dict()['state']`` trees (tensors bitwise unless ``rtol``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
        if a.is_floating_point():  # a NaN (ELRA's "no loss yet") must stay a NaN
            torch.testing.assert_close(a, b, rtol=rtol, atol=0.0, equal_nan=True, msg=where)
        else:
            assert torch.equal(a, b), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(a, key=str), sorted(b, key=str))
        for k in a:
            assert_states_equal(a[k], b[k], rtol=rtol, where=f"{where}/{k}")
    else:
        assert a == b, (where, a, b)


# ---- every registry entry: bridge state -> optax state -> bridge state ---------------------------


def test_resume_rows_cover_every_registry_entry():
    assert cases_resume.covered_entries() == set(registry.names())


def test_round_trip_leaves_the_target_optimizer_alone():
    """Lookahead over Adam (a nested state): ``to_optax`` then ``to_torch`` into a fresh optimizer gives the
    same state dict, and the fresh optimizer itself is unchanged. (Every registry entry's round trip is
    checked by its parity rows, ``parity/cases_resume.py``, in both directions.)"""
    _, factory, _ = cases_resume.ROWS["lookahead_adam"]
    ps = torch_params()
    opt = factory(ps)
    torch_steps(opt, ps, 3)
    before = opt.state_dict()
    params = flax_like(ps)
    tx, state = ck.to_optax(opt, params, mapping=MAPPING)
    fresh = factory(torch_params())
    empty = fresh.state_dict()
    sd = ck.to_torch(state, params, fresh, mapping=MAPPING)
    assert_states_equal(empty["state"], fresh.state_dict()["state"])
    assert_states_equal(before["state"], sd["state"])
    fresh.load_state_dict(sd)
    assert_states_equal(before["state"], fresh.state_dict()["state"])


def test_state_dict_file_and_factory_source(tmp_path):
    """A ``torch.save`` file + the class that wrote it gives the same optax state as the live optimizer."""
    ps = torch_params()
    opt = torch_bridge.EnhancedSGD(ps, lr=0.05, momentum=0.9, noise_scale=1e-3, seed=3)
    torch_steps(opt, ps, 2)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    params = flax_like(ps)
    _, live = ck.to_optax(opt, params, mapping=MAPPING)
    _, loaded = ck.to_optax(str(path), params, torch_bridge.EnhancedSGD, mapping=MAPPING)
    for a, b in zip(jax.tree.leaves(live), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if jnp.issubdtype(
            jnp.asarray(a).dtype, jax.dtypes.prng_key) else a), np.asarray(jax.random.key_data(b) if jnp.issubdtype(
                jnp.asarray(b).dtype, jax.dtypes.prng_key) else b))


# ---- torch.optim and optax as sources ------------------------------------------------------------


TORCH_OPTIM = [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2), js.sgd,
     dict(learning_rate=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1), js.adam, dict(learning_rate=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2), js.adamw, dict(learning_rate=1e-2)),
    ("ASGD", dict(lr=0.05, t0=2, lambd=1e-2), js.asgd, dict(learning_rate=0.05, t0=2, lambd=1e-2)),
]


@pytest.mark.parametrize("name, tkw, factory, jkw", TORCH_OPTIM, ids=[r[0] for r in TORCH_OPTIM])
def test_torch_optim_state_resumes_in_jax(name, tkw, factory, jkw):
    """torch.optim.X 3 steps, convert, 3 suite steps == 6 torch.optim.X steps (float32 bar)."""
    ref_ps = torch_params()
    ref = getattr(torch.optim, name)(ref_ps, foreach=False, **tkw)
    torch_steps(ref, ref_ps, 6)
    ps = torch_params()
    opt = getattr(torch.optim, name)(ps, foreach=False, **tkw)
    torch_steps(opt, ps, 3)
    params = flax_like(ps)
    tx, state = ck.to_optax(opt.state_dict(), params, getattr(torch.optim, name), mapping=MAPPING,
                            hyperparams={"learning_rate": jkw["learning_rate"]})
    out, _ = jax_steps(tx, state, params, 3)
    want = flax_like(ref_ps)
    for k in want:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    # the returned transformation is the suite's with the checkpoint's hyperparameters
    assert jax.tree.structure(jax.eval_shape(factory(**jkw).init, params)) == jax.tree.structure(state)


OPTAX = [
    ("Adam", dict(lr=1e-2), lambda: optax.adam(1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=1e-2), lambda: optax.adamw(1e-2, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9), lambda: optax.sgd(0.05, momentum=0.9)),
]


@pytest.mark.parametrize("name, tkw, build", OPTAX, ids=[r[0] for r in OPTAX])
def test_optax_and_torch_optim_both_ways(name, tkw, build):
    """optax 3 steps -> torch.optim 3 steps == optax 6 steps; torch.optim 3 -> optax 3 == torch.optim 6.
    The count (optax) is torch's step: both bias-correct update t+1 with t = updates already taken."""
    tx = build()
    params0 = flax_like(torch_params())
    want6, _ = jax_steps(tx, tx.init(params0), params0, 6)
    mid, state = jax_steps(tx, tx.init(params0), params0, 3)
    ps = torch_params()
    ck.load_into_torch(mid, ps, mapping=MAPPING)
    opt = getattr(torch.optim, name)(ps, foreach=False, **tkw)
    sd = ck.to_torch(state, mid, opt, mapping=MAPPING)
    if name != "SGD":
        assert {float(st["step"]) for st in sd["state"].values()} == {3.0}
    opt.load_state_dict(sd)
    torch_steps(opt, ps, 3)
    got = flax_like(ps)
    for k in want6:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want6[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    # and back: torch.optim after 6 steps -> optax state -> continue equals optax 9 steps
    want9, _ = jax_steps(tx, tx.init(params0), params0, 9)
    params = ck.flax_params(ps, mid, mapping=MAPPING)
    _, state2 = ck.to_optax(opt.state_dict(), params, mapping=MAPPING, tx=tx)
    got9, _ = jax_steps(tx, state2, params, 3)
    for k in want9:
        np.testing.assert_allclose(np.asarray(got9[k]), np.asarray(want9[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_optax_adam_state_into_the_bridge():
    tx = optax.adam(1e-2)
    params0 = flax_like(torch_params())
    mid, state = jax_steps(tx, tx.init(params0), params0, 2)
    ps = torch_params()
    ck.load_into_torch(mid, ps, mapping=MAPPING)
    opt = torch_bridge.Adam(ps, lr=1e-2)
    opt.load_state_dict(ck.to_torch(state, mid, opt, mapping=MAPPING))
    torch_steps(opt, ps, 2)
    want, _ = jax_steps(tx, state, mid, 2)
    got = flax_like(ps)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)


# ---- layouts: Conv and Linear with the default mapping -------------------------------------------


class _TorchConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, (3, 2))
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):  # NCHW
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


def _flax_conv_net():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.conv = nnx.Conv(2, 3, (3, 2), padding="VALID", rngs=rngs)
            self.fc = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x):  # NHWC
            return self.fc(jnp.tanh(self.conv(x)).mean(axis=(1, 2)))

    return Net()


def test_default_mapping_conv_and_linear_layouts():
    """torch (O, I, H, W) ⇄ Flax (H, W, I, O) and (out, in) ⇄ (in, out); the moments move exactly as the
    weights; the two models compute the same function; a resumed step matches torch's."""
    from flax import nnx

    torch.manual_seed(0)
    tm, fm = _TorchConvNet(), _flax_conv_net()
    like = nnx.state(fm, nnx.Param)
    assert leaf_paths(like) == ["conv/bias", "conv/kernel", "fc/bias", "fc/kernel"]
    mapping = default_mapping(like, [n for n, _ in tm.named_parameters()])
    assert mapping.paths == ("conv/kernel", "conv/bias", "fc/kernel", "fc/bias")
    assert mapping.axes == ((2, 3, 1, 0), None, (1, 0), None)
    nnx.update(fm, ck.flax_params(tm, like))
    x = np.random.default_rng(1).standard_normal((5, 2, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(fm(jnp.asarray(x.transpose(0, 2, 3, 1)))),
                               tm(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    opt = torch_bridge.Adam(tm.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        tm(torch.tensor(x)).pow(2).mean().backward()
        opt.step()
    params = ck.flax_params(tm, like)
    tx, state = ck.to_optax(opt, params, torch_names=[n for n, _ in tm.named_parameters()])
    adam = state[1]  # (weight decay, AdamState, ...)
    torch_state = opt.state_dict()["state"]
    np.testing.assert_array_equal(np.asarray(adam.mu["conv"]["kernel"][...]),
                                  torch_state[0]["exp_avg"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(adam.nu["fc"]["kernel"][...]), torch_state[2]["exp_avg_sq"].numpy().T)
    # one more step on each side agrees
    opt.zero_grad()
    tm(torch.tensor(x)).pow(2).mean().backward()
    opt.step()
    graphdef, _ = nnx.split(fm, nnx.Param)

    @jax.jit
    def flax_step(params, state):
        grads = jax.grad(lambda p: (nnx.merge(graphdef, p)(jnp.asarray(x.transpose(0, 2, 3, 1))) ** 2).mean())(params)
        updates, _ = tx.update(grads, state, params)
        return optax.apply_updates(params, updates)

    new = flax_step(params, state)
    np.testing.assert_allclose(np.asarray(new["conv"]["kernel"][...]),
                               tm.conv.weight.detach().numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-6)
    # and back into a fresh torch optimizer on the torch model: the same state dict
    fresh = torch_bridge.Adam(_TorchConvNet().parameters(), lr=1e-2)
    back = ck.to_torch(state, params, fresh)
    for pid in (0, 1, 2, 3):
        assert torch.equal(back["state"][pid]["exp_avg"], torch_state[pid]["exp_avg"])


def test_default_mapping_rejects_another_module_order():
    like = {"a": {"bias": jnp.zeros(2), "kernel": jnp.zeros((3, 2))}}
    with pytest.raises(ValueError, match=r"torch parameter 'a\.bias' meets Flax leaf 'a/kernel'"):
        default_mapping(like, ["a.bias", "a.weight"])
    with pytest.raises(ValueError, match="torch has 1 parameters, the Flax params 2"):
        default_mapping(like, ["a.weight"])


# ---- errors --------------------------------------------------------------------------------------


@pytest.fixture
def adam_checkpoint():
    ps = torch_params()
    opt = torch_bridge.Adam(ps, lr=1e-2)
    torch_steps(opt, ps, 2)
    return opt, flax_like(ps)


def test_error_shape_mismatch_names_the_parameter(adam_checkpoint):
    opt, params = adam_checkpoint
    bad = {**params, "w1": jnp.zeros((3, 5))}
    with pytest.raises(ValueError, match=r"shape mismatch for parameter 'w1'.*exp_avg.*\(4, 3\)"):
        ck.to_optax(opt.state_dict(), bad, torch_bridge.Adam, mapping=MAPPING)
    with pytest.raises(ValueError, match=r"shape mismatch for parameter w1"):
        ck.to_optax(opt, bad, mapping=MAPPING)
    _, state = ck.to_optax(opt, params, mapping=MAPPING)
    wide = [torch.zeros(5, 3, requires_grad=True), *torch_params()[1:]]
    with pytest.raises(ValueError, match=r"shape mismatch for parameter w1"):
        ck.to_torch(state, params, torch_bridge.Adam(wide, lr=1e-2), mapping=MAPPING)


def test_error_wrong_optimizer(adam_checkpoint):
    opt, params = adam_checkpoint
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=r"optimizer mismatch: the checkpoint.s param groups have no .*momentum.*and have .*betas"):
        ck.to_optax(sd, params, torch_bridge.SGD, mapping=MAPPING)
    with pytest.raises(ValueError, match="optimizer mismatch.*decoupled_weight_decay"):
        ck.to_optax(sd, params, torch_bridge.AdamW, mapping=MAPPING)
    with pytest.raises(ValueError, match=r"optimizer mismatch: parameter 'w1' has state"):
        ck.to_optax(sd, params, mapping=MAPPING, tx=optax.sgd(0.1, momentum=0.9))
    with pytest.raises(ValueError, match="optimizer mismatch: the converted state is not structured"):
        ck.to_optax(sd, params, torch_bridge.Adam, mapping=MAPPING, tx=js.sgd(0.1, momentum=0.9))
    _, state = ck.to_optax(opt, params, mapping=MAPPING)
    with pytest.raises(ValueError, match="optimizer mismatch"):
        ck.to_torch(state, params, torch.optim.SGD(torch_params(), lr=0.1, momentum=0.9), mapping=MAPPING)
    with pytest.raises(ValueError, match="optimizer mismatch: RMSprop"):
        ck.to_torch(state, params, torch.optim.RMSprop(torch_params()), mapping=MAPPING)


def test_error_hyperparameter_mismatch(adam_checkpoint):
    opt, params = adam_checkpoint
    with pytest.raises(ValueError, match=r"hyperparameter mismatch: learning_rate=0.1 expected.*0.01"):
        ck.to_optax(opt.state_dict(), params, torch_bridge.Adam, mapping=MAPPING, hyperparams={"learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"hyperparameter mismatch: b1=0.8 expected"):
        ck.to_optax(opt.state_dict(), params, mapping=MAPPING, tx=optax.adam(1e-2, b1=0.8), hyperparams={"b1": 0.8})
    _, state = ck.to_optax(opt, params, mapping=MAPPING)
    with pytest.raises(ValueError, match=r"hyperparameter mismatch: learning_rate=0.01 expected, Adam has "
                                         r"learning_rate=0.1"):
        ck.to_torch(state, params, torch_bridge.Adam(torch_params(), lr=0.1), mapping=MAPPING,
                    hyperparams={"learning_rate": 1e-2})


def test_error_dtype_mismatch(adam_checkpoint):
    opt, params = adam_checkpoint
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        with pytest.raises(ValueError, match=r"dtype mismatch for parameter 'w1'.*float32.*float64"):
            ck.to_optax(opt.state_dict(), p64, torch_bridge.Adam, mapping=MAPPING)
        with pytest.raises(ValueError, match=r"dtype mismatch for parameter w1"):
            ck.to_optax(opt, p64, mapping=MAPPING)


def test_mapping_validation():
    with pytest.raises(ValueError, match="not a permutation"):
        ParamMapping.from_pairs([("w", (0, 0))])
    with pytest.raises(ValueError, match="appear more than once"):
        ParamMapping.from_pairs([("w", None), ("w", None)])
    with pytest.raises(ValueError, match=r"params leaves \['b'\] have no torch parameter"):
        ParamMapping.from_pairs([("w", None)]).order({"w": jnp.zeros(2), "b": jnp.zeros(2)})
