"""``load_state_dict`` checks the loaded state at load time, for every bridge class.

Each class is built on a small ``nn.Linear``, stepped twice, and its ``state_dict()`` corrupted the ways a
checkpoint goes wrong: a key dropped, a key added, a shape or dtype changed, another optimizer's state dict,
a param-group mismatch. The ``ValueError`` must come from ``load_state_dict`` itself (not from the next
``step``), name the key and leave the optimizer as it was. Where torch.optim accepts a state dict silently,
the bridge does the same with a ``UserWarning``; a valid round trip still resumes bit for bit.
"""

import copy
import re
import warnings

import pytest
import torch

import torch_bridge as tb
from jaxopt_suite import registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILDERS = {
    "SGD": lambda p: tb.SGD(p, lr=0.1, momentum=0.9, dampening=0.1),
    "Adam": lambda p: tb.Adam(p, lr=1e-2),
    "Adam-amsgrad": lambda p: tb.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: tb.AdamW(p, lr=1e-2),
    "ADOPT": lambda p: tb.ADOPT(p, lr=1e-2),
    "ASGD": lambda p: tb.ASGD(p, lr=1e-2),
    "ASGD-momentum": lambda p: tb.ASGD(p, lr=1e-2, momentum=0.9),
    "Lookahead-SGD": lambda p: tb.Lookahead(tb.SGD(p, lr=0.1, momentum=0.9), k=3),
    "Lookahead-Adam": lambda p: tb.Lookahead(tb.Adam(p, lr=1e-2), k=3),
    "AutoSGM": lambda p: tb.AutoSGM(p),
    "ELRA": lambda p: tb.ELRA(p, lr=1e-3),
    "ELRA-dnn": lambda p: tb.ELRA(p, lr=1e-3, classes=10),
    "EnhancedSGD": lambda p: tb.EnhancedSGD(p, seed=0),
    "JaxOptimizer-adam": lambda p: tb.JaxOptimizer(p, "adam"),
    "JaxOptimizer-autosgm_hb": lambda p: tb.JaxOptimizer(p, "autosgm_hb"),
}
# state dicts of one family are (partly) each other's format on purpose; the rest must be told apart
FAMILY = {"Adam": "adam", "Adam-amsgrad": "adam", "AdamW": "adam", "ASGD": "asgd", "ASGD-momentum": "asgd",
          "ELRA": "elra", "ELRA-dnn": "elra"}
NEEDS_VALUE = ("ELRA", "ELRA-dnn", "EnhancedSGD")
NAMES = list(BUILDERS)

X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


def build(name, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = BUILDERS[name](model.parameters())
    assert type(opt).__name__ == name.split("-")[0]  # the case names start with the class name
    return model, opt


def train(name, model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = model(X).pow(2).sum() + 1.0  # positive (ELRA)
        loss.backward()
        if name in NEEDS_VALUE:
            opt.step(value=loss)
        else:
            opt.step()


_TRAINED = {}


def trained(name):
    """(model state, optimizer state dict) after two steps, cached per class (deep copies handed out)."""
    if name not in _TRAINED:
        model, opt = build(name)
        train(name, model, opt, 2)
        _TRAINED[name] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    model_sd, sd = _TRAINED[name]
    return copy.deepcopy(model_sd), copy.deepcopy(sd)


def load_raises(name, sd, *patterns):
    """Loading ``sd`` into a fresh ``name`` raises ValueError in load_state_dict; the optimizer is unchanged."""
    _, opt = build(name, seed=1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and not after["state"] and not before["state"]
    return message


def param_keys(sd):
    """(element keys, scalar keys) of parameter 0 (the (2, 3) weight)."""
    st = sd["state"][0]
    element = [k for k, v in st.items() if torch.is_tensor(v) and tuple(v.shape) == (2, 3)]
    return element, [k for k in st if k not in element]


def test_every_registry_bridge_class_is_covered():
    classes = {n.split("-")[0] for n in NAMES}  # build() checks that each case is an instance of its class
    wanted = {e.torch_bridge_class for e in registry.entries() if e.torch_bridge_class}
    assert wanted <= classes, wanted - classes


@pytest.mark.parametrize("name", NAMES)
def test_missing_and_unknown_keys_raise_at_load(name):
    _, sd = trained(name)
    element, scalar = param_keys(sd)
    tried = 0
    for key in element + scalar:
        bad = copy.deepcopy(sd)
        del bad["state"][0][key]
        if name == "SGD":  # torch.optim.SGD reads a missing buffer as "not started": see the warning test
            continue
        load_raises(name, bad, repr(key), "parameter 0 of param group 0 (shape (2, 3))", "missing")
        tried += 1
    bad = copy.deepcopy(sd)
    bad["state"][1]["not_a_state_key"] = torch.zeros(2)
    load_raises(name, bad, "'not_a_state_key'", "parameter 1 of param group 0 (shape (2,))", "unknown")
    tried += 1
    # global (non-parameter) entries of the classes that keep one
    for entry in [k for k in sd["state"] if isinstance(k, str)]:
        first = next(iter(sd["state"][entry]))
        bad = copy.deepcopy(sd)
        del bad["state"][entry][first]
        load_raises(name, bad, repr(entry), repr(first), "missing")
        bad = copy.deepcopy(sd)
        bad["state"][entry]["not_a_field"] = torch.zeros(())
        load_raises(name, bad, "'not_a_field'", "unknown")
        bad = copy.deepcopy(sd)
        del bad["state"][entry]
        load_raises(name, bad, repr(entry), "missing")
        tried += 3
    assert tried >= 1


@pytest.mark.parametrize("name", NAMES)
def test_wrong_shapes_raise_at_load(name):
    _, sd = trained(name)
    element, scalar = param_keys(sd)
    for key in element:
        bad = copy.deepcopy(sd)
        bad["state"][0][key] = torch.zeros(3, 2)
        load_raises(name, bad, repr(key), "parameter 0 of param group 0 (shape (2, 3))", "(3, 2)")
        bad = copy.deepcopy(sd)
        bad["state"][1][key] = torch.zeros(6)  # same numel as the other parameter, still wrong
        load_raises(name, bad, repr(key), "parameter 1 of param group 0 (shape (2,))", "(6,)")
    for key in scalar:
        bad = copy.deepcopy(sd)
        bad["state"][0][key] = torch.zeros(3)
        load_raises(name, bad, repr(key), "parameter 0 of param group 0", "(3,)")
    for entry in [k for k in sd["state"] if isinstance(k, str)]:
        key, value = next((k, v) for k, v in sd["state"][entry].items() if torch.is_tensor(v))
        bad = copy.deepcopy(sd)
        bad["state"][entry][key] = torch.zeros(tuple(value.shape) + (2,))
        load_raises(name, bad, repr(entry), repr(key), "shape")


@pytest.mark.parametrize("name", NAMES)
def test_wrong_dtypes_raise_at_load(name):
    _, sd = trained(name)
    element, scalar = param_keys(sd)
    for key in element:  # not a tensor at all
        bad = copy.deepcopy(sd)
        bad["state"][0][key] = bad["state"][0][key].tolist()
        load_raises(name, bad, repr(key), "parameter 0 of param group 0 (shape (2, 3))", "list")
    for key in scalar:  # torch does not cast 'step'; the others it casts to the parameter's dtype
        bad = copy.deepcopy(sd)
        bad["state"][0][key] = torch.tensor(True) if key == "step" else "2"
        load_raises(name, bad, repr(key), "parameter 0 of param group 0")
    if "controller" in sd["state"]:  # the PRNG key must stay integer data
        bad = copy.deepcopy(sd)
        bad["state"]["controller"]["key"] = bad["state"]["controller"]["key"].float() + 0.5
        load_raises(name, bad, "'controller'", "'key'", "dtype")
    if "elra" in sd["state"]:
        bad = copy.deepcopy(sd)
        bad["state"]["elra"]["calls"] = torch.tensor(2.5)
        load_raises(name, bad, "'elra'", "'calls'", "non-integral")


@pytest.mark.parametrize("name", NAMES)
def test_other_optimizers_state_dicts_raise_at_load(name):
    tried = 0
    for other in NAMES:
        if other == name or (FAMILY.get(other, other) == FAMILY.get(name, name)):
            continue
        _, sd = trained(other)
        message = load_raises(name, sd)
        assert "load_state_dict" in message and re.search(r"'[^']+'", message), message
        assert "another optimizer" in message or "unknown" in message or "missing" in message, message
        tried += 1
    assert tried >= len(NAMES) - 3


def test_adam_into_sgd_and_sgd_into_adam_name_the_keys():
    _, adam_sd = trained("Adam")
    load_raises("SGD", adam_sd, "'dampening'", "'momentum'", "another optimizer")
    _, adopt_sd = trained("ADOPT")  # the same per-parameter keys as Adam's; the groups tell them apart
    load_raises("Adam", adopt_sd, "'amsgrad'", "'decouple'", "another optimizer")
    _, sgd_sd = trained("SGD")
    load_raises("Adam", sgd_sd, "'betas'", "'eps'", "another optimizer")


@pytest.mark.parametrize("name", NAMES)
def test_param_group_mismatches_keep_torch_messages(name):
    _, sd = trained(name)
    bad = copy.deepcopy(sd)
    bad["param_groups"] = bad["param_groups"] * 2
    with pytest.raises(ValueError, match="different number of parameter groups"):
        build(name, seed=1)[1].load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:1]
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        build(name, seed=1)[1].load_state_dict(bad)


def _resume(name, sd, model_sd, steps=2, expect_warning=None):
    model, opt = build(name, seed=1)
    model.load_state_dict(model_sd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(sd)
    ours = [str(w.message) for w in caught if "load_state_dict" in str(w.message)]
    if expect_warning is None:
        assert not ours, ours
    else:
        assert any(expect_warning in m for m in ours), ours
        assert all(w.filename == __file__ for w in caught if "load_state_dict" in str(w.message))
    train(name, model, opt, steps)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_valid_round_trip_still_resumes_bit_for_bit(name):
    ref_model, ref_opt = build(name)
    train(name, ref_model, ref_opt, 4)
    model_sd, sd = trained(name)
    resumed = _resume(name, sd, model_sd)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), resumed.parameters()))
    # a dtype torch casts (float64 state for float32 parameters) is cast the same way, without a warning
    element, _ = param_keys(sd)
    for st in [v for k, v in sd["state"].items() if not isinstance(k, str)]:
        for key in element:
            st[key] = st[key].double()
    resumed = _resume(name, sd, model_sd)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), resumed.parameters()))


@pytest.mark.parametrize("corrupt", ["dropped", "None"])
def test_sgd_missing_momentum_buffer_warns_and_matches_torch(corrupt):
    model_sd, sd = trained("SGD")
    if corrupt == "dropped":
        del sd["state"][0]["momentum_buffer"]
    else:
        sd["state"][0]["momentum_buffer"] = None
    ours = _resume("SGD", copy.deepcopy(sd), model_sd, expect_warning="has no state 'momentum_buffer'")
    torch.manual_seed(1)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model_sd)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    opt.load_state_dict(sd)  # torch accepts it silently and starts that buffer from the next gradient
    train("SGD", ref, opt, 2)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_keys_torch_ignores_warn():
    model_sd, sd = trained("Adam")
    ref_model, ref_opt = build("Adam")
    train("Adam", ref_model, ref_opt, 4)
    # a key of the class that this configuration does not use (torch's Adam keeps max_exp_avg_sq unused)
    sd["state"][0]["max_exp_avg_sq"] = torch.zeros(2, 3)
    resumed = _resume("Adam", copy.deepcopy(sd), model_sd, expect_warning="'max_exp_avg_sq' is not used")
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), resumed.parameters()))
    # a state entry that belongs to no parameter (torch copies it as it is)
    del sd["state"][0]["max_exp_avg_sq"]
    sd["state"][7] = {"step": torch.tensor(1.0)}
    resumed = _resume("Adam", sd, model_sd, expect_warning="state entry 7 belongs to no parameter")
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), resumed.parameters()))


def test_never_stepped_parameters_need_no_state():
    model_sd, sd = trained("Adam")
    del sd["state"][1]  # torch's format for a parameter that has not been stepped
    sd["state"][1] = {}
    _resume("Adam", sd, model_sd)


def test_lookahead_around_a_stepped_optimizer_saves_complete_state():
    """A Lookahead state_dict taken before its first step (the inner optimizer stepped) loads and resumes."""
    def fresh(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        return model, tb.Adam(model.parameters(), lr=1e-2)

    def run(model, opt, steps):
        train("Lookahead-Adam", model, opt, steps)

    m_ref, inner = fresh()
    run(m_ref, inner, 2)
    o_ref = tb.Lookahead(inner, k=2)
    m, inner2 = fresh()
    run(m, inner2, 2)
    o = tb.Lookahead(inner2, k=2)
    sd = o.state_dict()
    assert {"slow_param", "exp_avg", "exp_avg_sq", "step"} == set(sd["state"][0])
    m2, inner3 = fresh(seed=1)
    o2 = tb.Lookahead(inner3, k=2)
    m2.load_state_dict(m.state_dict())
    o2.load_state_dict(sd)
    run(m_ref, o_ref, 3)
    run(m2, o2, 3)
    assert all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m2.parameters()))


def test_elra_add_param_group_after_steps_saves_complete_state():
    """ELRA's entries for a group added after some steps are complete, so that state_dict loads and resumes."""
    def fresh(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
        return model, tb.ELRA(model[0].parameters(), lr=1e-3, classes=10)

    def run(model, opt, steps):
        train("ELRA", model, opt, steps)

    m_ref, o_ref = fresh()
    run(m_ref, o_ref, 2)
    o_ref.add_param_group({"params": list(m_ref[1].parameters())})
    m, o = fresh()
    run(m, o, 2)
    o.add_param_group({"params": list(m[1].parameters())})
    sd = o.state_dict()
    assert set(sd["state"][2]) == {"x_lastgood", "g_old", "coll_grad"}
    m2, o2 = fresh(seed=1)
    o2.add_param_group({"params": list(m2[1].parameters())})
    m2.load_state_dict(m.state_dict())
    o2.load_state_dict(sd)
    run(m_ref, o_ref, 2)
    run(m2, o2, 2)
    assert all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m2.parameters()))


def test_group_level_jax_state_is_checked():
    """Global JAX leaves that no torch key names travel in the group's 'jax_state' (generic JaxOptimizer)."""
    def fresh(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        return model, tb.JaxOptimizer(model.parameters(), "lookahead_sgd")

    model, opt = fresh()
    train("JaxOptimizer", model, opt, 2)
    sd = opt.state_dict()
    assert set(sd["param_groups"][0]["jax_state"]) == {"LookaheadState.count"}
    fresh(1)[1].load_state_dict(copy.deepcopy(sd))
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["jax_state"]["LookaheadState.count"] = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"param group 0: 'jax_state' key 'LookaheadState.count' has shape \(5,\)"):
        fresh(1)[1].load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["jax_state"]["NotAState.field"] = torch.zeros(())
    with pytest.raises(ValueError, match="unknown 'jax_state' key 'NotAState.field'"):
        fresh(1)[1].load_state_dict(bad)


@pytest.mark.parametrize("name", ["SGD", "Adam", "ASGD", "Lookahead-SGD", "AutoSGM", "ELRA", "EnhancedSGD",
                                  "JaxOptimizer-adam"])
def test_complex_state_for_real_parameter_raises_at_load(name):
    _, sd = trained(name)
    st = next(v for v in sd["state"].values() if isinstance(v, dict) and any(
        torch.is_tensor(t) and t.dim() > 0 for t in v.values()))
    key = next(k for k, t in st.items() if torch.is_tensor(t) and t.dim() > 0)
    st[key] = st[key].to(torch.complex64)
    _, opt = build(name)
    with pytest.raises(ValueError, match=re.escape(repr(key)) + ".*complex64"):
        opt.load_state_dict(sd)


def _torch_lookahead():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = tb.lookahead.TorchLookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=3)
    for _ in range(2):
        opt.zero_grad()
        model(X).pow(2).sum().backward()
        opt.step()
    return model, opt


def _fresh_torch_lookahead():
    model = torch.nn.Linear(3, 2)
    return tb.lookahead.TorchLookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=3)


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd["state"][0].pop("slow_param"), "parameter 0 of param group 0.*'slow_param' is missing"),
    (lambda sd: sd["state"][0].__setitem__("bogus", torch.zeros(2, 3)), "unknown state 'bogus'"),
    (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(3, 2)), "'momentum_buffer' has shape"),
    (lambda sd: sd["state"][0].__setitem__("momentum_buffer", [[0.0] * 3] * 2), "'momentum_buffer' is a list"),
    (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(2, 3, dtype=torch.complex64)),
     "'momentum_buffer' has dtype torch.complex64"),
    (lambda sd: [g.pop("k") for g in sd["param_groups"]], "another optimizer"),
])
def test_torch_lookahead_load_state_dict_is_validated(corrupt, match):
    _, opt = _torch_lookahead()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    with pytest.raises(ValueError, match=match):
        _fresh_torch_lookahead().load_state_dict(sd)


def test_torch_lookahead_rejects_an_adam_state_dict():
    model = torch.nn.Linear(3, 2)
    adam = tb.Adam(model.parameters(), lr=1e-2)
    model(X).pow(2).sum().backward()
    adam.step()
    with pytest.raises(ValueError, match="another optimizer"):
        _fresh_torch_lookahead().load_state_dict(adam.state_dict())


def test_torch_lookahead_missing_momentum_buffer_warns():
    _, opt = _torch_lookahead()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0].pop("momentum_buffer")
    with pytest.warns(UserWarning, match="momentum_buffer"):
        _fresh_torch_lookahead().load_state_dict(sd)
