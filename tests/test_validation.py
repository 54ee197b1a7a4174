"""Constructor validation (issues 15.1 and 11.4): one layer for the JAX factories, the named bridge classes and the
generic ``torch_bridge.JaxOptimizer(params, "name", **kw)``.

Construction only (no compiled step) except for a few valid edge values that must still train. The tables try,
for every numeric hyperparameter, NaN, inf, -1 (where out of range), None, the string "0.1" and True, and for
every flag "no", 1 and None; each must raise ``ValueError`` or ``TypeError`` at construction with a message
naming the argument.
"""

from __future__ import annotations

import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxopt_suite as js
import torch_bridge as tb
from jaxopt_suite import registry
from jaxopt_suite._common import HyperparameterTypeError, factory_signature

NUM_BAD = [("nan", math.nan), ("inf", math.inf), ("neg", -1.0), ("none", None), ("str", "0.1"), ("bool", True)]
FLAG_BAD = [("no", "no"), ("one", 1), ("none", None)]
INT_BAD = [("frac", 2.5), ("str", "2"), ("none", None), ("bool", True), ("neg", -1), ("nan", math.nan),
           ("inf", math.inf)]

# arguments whose -1 is valid (an axis, a seed)
NEG_OK = {"centering_axis", "seed"}
# how messages may spell an argument
ALIASES = {"lr": ("lr", "learning rate", "learning_rate"), "learning_rate": ("learning_rate", "lr"),
           "eps": ("eps", "epsilon"), "betas[0]": ("beta",), "betas[1]": ("beta",), "k": ("k value", "k "),
           "alpha": ("alpha",)}


def names_argument(message: str, name: str) -> bool:
    message = message.lower()
    return any(alias.lower() in message for alias in ALIASES.get(name, (name,)))


def assert_clear(err, name):
    assert names_argument(str(err.value), name), f"message does not name {name!r}: {err.value}"


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


# --------------------------------------------------------------------------------------------------
# the JAX factories, through every registry entry
# --------------------------------------------------------------------------------------------------


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numeric_args(entry):
    """Every numeric argument of the entry's factory: its injectable hyperparameters and the numeric options."""
    sig = factory_signature(entry.factory)
    out = list(entry.hyperparams)
    out += [n for n, p in sig.parameters.items() if _is_number(p.default) and n not in out]
    return out, sig


def _bad_value_cases(rename=lambda name: name):
    """``pytest.param(entry, key, bad)`` for every entry: each numeric argument with each of NUM_BAD (None
    skipped where None is the documented default, e.g. momentum: no buffer), each bool flag with each of
    FLAG_BAD. ``rename`` maps a factory argument to the key the caller passes (``lr`` for the bridge)."""
    for entry in registry.entries():
        numeric, sig = _numeric_args(entry)
        for name in numeric:
            key = rename(name)
            for label, bad in NUM_BAD:
                if bad is None and sig.parameters[name].default is None:
                    continue
                if label == "neg" and name in NEG_OK:
                    continue
                yield pytest.param(entry.name, key, bad, id=f"{entry.name}-{key}-{label}")
        for name, par in sig.parameters.items():
            if isinstance(par.default, bool):
                for label, bad in FLAG_BAD:
                    yield pytest.param(entry.name, name, bad, id=f"{entry.name}-{name}-{label}")


FACTORY_CASES = list(_bad_value_cases())


@pytest.mark.parametrize("entry_name, name, bad", FACTORY_CASES)
def test_factory_rejects_bad_values(entry_name, name, bad):
    entry = registry.get(entry_name)
    with pytest.raises((ValueError, TypeError)) as err:
        entry.build(**{name: bad})
    assert_clear(err, name)


@pytest.mark.parametrize("factory", [js.sgd, js.adam, js.adopt, js.adamw, js.asgd])
def test_none_learning_rate_raises_at_construction(factory):
    # sgd/adam/adopt ran and ascended with None; adamw/asgd failed late with an unrelated TypeError
    with pytest.raises(HyperparameterTypeError, match="Invalid learning_rate: None"):
        factory(learning_rate=None)
    assert issubclass(HyperparameterTypeError, TypeError) and issubclass(HyperparameterTypeError, ValueError)


@pytest.mark.parametrize("call, name", [
    (lambda: js.sgd(math.inf), "learning_rate"), (lambda: js.adam(weight_decay=math.inf), "weight_decay"),
    (lambda: js.adam(eps=math.inf), "eps"), (lambda: js.asgd(alpha=math.inf), "alpha"),
    (lambda: js.asgd(t0=math.inf), "t0"), (lambda: js.autosgm(eta_i=math.inf), "eta_i"),
    (lambda: js.elra(classes=2.5), "classes"), (lambda: js.autosgm(debias="no"), "debias"),
    (lambda: js.enhanced_sgd(learning_rate=None), "learning_rate"),
    (lambda: js.enhanced_sgd(learning_rate=[0.1, None]), "learning_rate"),
])
def test_reproduced_factory_failures(call, name):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert_clear(err, name)
    if "inf;" in str(err.value):  # an infinite value: the message says finite values only
        assert "finite" in str(err.value)


def test_autosgm_tuples_do_not_read_strings_as_flags():
    from jaxopt_suite.autosgm.autosgm import config_from_tuples

    with pytest.raises(TypeError, match="debias"):
        config_from_tuples(beta_cfg=(0.9999, 0.999, 0.9, 0.0, 0.0, "no"))
    with pytest.raises(ValueError, match="num_lrc"):  # 2.5 is not truncated to 2
        js.autosgm_from_config(lr_cfg=(True, 1e-2, 2.5))
    assert config_from_tuples(beta_cfg=(0.9999, 0.999, 0.9, 0.0, 0.0, 0))["debias"] is False  # reference 0/1


def test_factory_valid_edge_values():
    p = {"w": jnp.ones(3)}
    g = {"w": jnp.full(3, 0.5)}
    for factory in (js.sgd, js.adam, js.adamw, js.adopt, js.asgd, js.lookahead_sgd, js.lookahead_adam):
        factory(learning_rate=0.0, weight_decay=0.0)
    for factory in (js.sgd, js.adam):
        tx = factory(learning_rate=0.0, weight_decay=0.0)
        u, _ = tx.update(g, tx.init(p), p)
        assert float(jnp.abs(u["w"]).max()) == 0.0  # lr = 0: a valid optimizer that does not move
    for entry in registry.entries():
        if entry.supports_schedules:
            sched = optax.exponential_decay(1e-2, transition_steps=10, decay_rate=0.5)
            entry.build(learning_rate=sched)  # a schedule is checked at its first value, not rejected
    js.sgd(0.1, momentum=None)  # None where it means something
    js.asgd(0.1, momentum=None)
    js.elra(1e-5, momentum=None)
    js.sgd(np.float32(0.1), momentum=np.float64(0.9))  # NumPy scalars are numbers
    js.adam(jnp.asarray(1e-3))  # so are concrete JAX arrays


def test_schedule_checked_at_its_first_value():
    with pytest.raises(ValueError, match="learning_rate"):
        js.adam(lambda count: -1e-3 + 0 * count)
    with pytest.raises(ValueError, match="learning_rate"):
        js.sgd(lambda count: jnp.inf + 0 * count)


def test_injected_values_checked_where_concrete():
    p = {"w": jnp.ones(3)}
    # init outside jit: the injected values are concrete and checked like the factory's arguments
    with pytest.raises(ValueError, match="learning_rate"):
        js.inject_hyperparams(js.adam)(learning_rate=math.inf).init(p)
    with pytest.raises(ValueError, match="b1"):
        optax.inject_hyperparams(js.adam)(b1=math.nan).init(p)
    # inside jit they are traced and unchecked (documented): no error at trace time
    tx = js.inject_hyperparams(js.adam)(learning_rate=1e-3)
    state = tx.init(p)
    state.hyperparams["learning_rate"] = jnp.asarray(math.inf)
    u, _ = jax.jit(tx.update)(p, state, p)
    assert np.isinf(np.asarray(u["w"])).all()  # used as given


# --------------------------------------------------------------------------------------------------
# the named bridge classes
# --------------------------------------------------------------------------------------------------

# class -> (constructor, base kwargs, numeric arguments, flags, optional flags (None valid), flags with 1 valid,
#           integer arguments)
ADAM_NUM = ["lr", "eps", "weight_decay", "betas[0]", "betas[1]"]
BRIDGE = {
    "SGD": (tb.SGD, {"lr": 0.1, "momentum": 0.9}, ["lr", "momentum", "dampening", "weight_decay"],
            ["nesterov", "maximize", "differentiable"], ["foreach", "fused"], [], []),
    "Adam": (tb.Adam, {}, ADAM_NUM, ["amsgrad", "maximize", "capturable", "differentiable"],
             ["foreach", "fused", "decoupled_weight_decay"], [], []),  # decoupled_weight_decay=None: the default
    "AdamW": (tb.AdamW, {}, ADAM_NUM, ["amsgrad", "maximize", "capturable", "differentiable"],
              ["foreach", "fused"], [], []),
    "ADOPT": (tb.ADOPT, {}, ADAM_NUM, ["decouple", "maximize", "capturable", "differentiable"],
              ["foreach", "fused"], [], []),
    "ASGD": (tb.ASGD, {}, ["lr", "lambd", "alpha", "t0", "weight_decay", "momentum"],
             ["maximize", "differentiable", "capturable"], ["foreach"], [], []),
    "AutoSGM": (tb.AutoSGM, {}, ["learning_rate", "beta_n", "beta_a", "beta_i", "gamma_i", "eta_i", "weight_decay",
                                 "eps"], ["maximize", "dbg", "debias", "aoptlr"], [], ["debias", "aoptlr"], []),
    "ELRA": (tb.ELRA, {}, ["lr", "weight_decay", "warmup", "momentum"], [], [], [], ["classes", "batch_size"]),
    "EnhancedSGD": (tb.EnhancedSGD, {"seed": 0},
                    ["lr", "momentum", "smoothing_factor", "noise_scale", "entropy_weight", "loss_correction_factor",
                     "retention_weight", "q_learning_rate", "q_discount", "q_epsilon", "q_epsilon_decay",
                     "q_epsilon_min", "q_initial_mix_prob", "lookahead_alpha", "max_momentum", "bayesian_prior_std"],
                    ["apply_noise", "adaptive_momentum", "gradient_clipping", "gradient_retention", "bayesian_init",
                     "gradient_centering"], [], [],
                    ["gradient_buffer_size", "spike_recovery_steps", "entropy_bins", "lookahead_k"]),
}
# None is valid for these numeric arguments (ELRA: a falsy momentum means none)
NONE_OK = {("ELRA", "momentum")}


def _bridge_kwargs(cls_name, name, value):
    _, base, *_ = BRIDGE[cls_name]
    kwargs = dict(base)
    if name.startswith("betas["):
        betas = [0.9, 0.999]
        betas[int(name[6])] = value
        kwargs["betas"] = tuple(betas)
    else:
        kwargs[name] = value
    return kwargs


def _bridge_cases():
    for cls_name, (_, _, numeric, flags, optional_flags, one_ok, ints) in BRIDGE.items():
        for name in numeric:
            for label, bad in NUM_BAD:
                if bad is None and (cls_name, name) in NONE_OK:
                    continue
                yield pytest.param(cls_name, name, bad, id=f"{cls_name}-{name}-{label}")
        for name in ints:
            for label, bad in INT_BAD:
                yield pytest.param(cls_name, name, bad, id=f"{cls_name}-{name}-{label}")
        for name in flags + optional_flags:
            for label, bad in FLAG_BAD:
                if (bad is None and name in optional_flags) or (bad == 1 and name in one_ok):
                    continue
                yield pytest.param(cls_name, name, bad, id=f"{cls_name}-{name}-{label}")
    for label, bad in INT_BAD + [("zero", 0)]:
        yield pytest.param("Lookahead", "k", bad, id=f"Lookahead-k-{label}")
    for label, bad in NUM_BAD + [("zero", 0.0)]:
        yield pytest.param("Lookahead", "alpha", bad, id=f"Lookahead-alpha-{label}")


BRIDGE_CASES = list(_bridge_cases())


@pytest.mark.parametrize("cls_name, name, bad", BRIDGE_CASES)
def test_bridge_class_rejects_bad_values(cls_name, name, bad):
    expected = (ValueError, TypeError)
    if cls_name == "ADOPT" and name == "fused":
        expected = RuntimeError  # torch-adopt's own error for any truthy fused, kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ELRA's x64 note, differentiable=True is ignored
        with pytest.raises(expected) as err:
            if cls_name == "Lookahead":
                tb.Lookahead(tb.SGD(params(), lr=0.1), **{name: bad})
            else:
                BRIDGE[cls_name][0](params(), **_bridge_kwargs(cls_name, name, bad))
    assert_clear(err, name)


@pytest.mark.parametrize("kwargs", [
    dict(lr=math.nan), dict(lr=math.inf), dict(momentum=math.nan), dict(momentum=math.inf),
    dict(dampening=math.nan), dict(weight_decay=math.inf), dict(lr=torch.tensor(math.inf)),
])
def test_bridge_stricter_than_torch_on_nonfinite(kwargs):
    # torch.optim.SGD accepts these; the bridge rejects them, naming the argument and saying so
    torch.optim.SGD(params(), **{"lr": 0.1, **kwargs})
    with pytest.raises(ValueError, match="must be finite|allowed range") as err:
        tb.SGD(params(), **{"lr": 0.1, **kwargs})
    assert names_argument(str(err.value), next(iter(kwargs)))


def test_bridge_string_gives_a_clear_type_error():
    with pytest.raises(TypeError, match="lr must be a real number.*'0.1' \\(str\\)"):
        tb.SGD(params(), lr="0.1")
    with pytest.raises(TypeError, match="momentum must be a real number"):
        tb.SGD(params(), lr=0.1, momentum="0.9")


def test_bridge_flags_are_not_truthy_strings():
    with pytest.raises(TypeError, match="maximize must be a bool"):
        tb.SGD(params(), lr=0.1, maximize="no")
    with pytest.raises(TypeError, match="amsgrad must be a bool"):
        tb.Adam(params(), amsgrad="False")
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        tb.SGD(params(), lr=0.1, momentum=0.9, nesterov="yes")


def test_elra_classes_must_be_an_int():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="classes"):
            tb.ELRA(params(), classes=2.5)  # was DNN mode
        assert tb.ELRA(params(), classes=np.int64(10))._entry_name == "elra_dnn"
        assert tb.ELRA(params(), momentum=0)._kwargs["momentum"] is None  # falsy: no momentum, as the package


def test_lookahead_alpha_zero_rejected():
    with pytest.raises(ValueError, match="Invalid alpha value: 0.0"):
        tb.Lookahead(tb.SGD(params(), lr=0.1), k=5, alpha=0.0)
    tb.Lookahead(tb.SGD(params(), lr=0.1), k=5, alpha=1.0)


def test_add_param_group_is_validated_and_left_out_on_failure():
    opt = tb.Adam(params())
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        opt.add_param_group({"params": params(), "lr": -1.0})
    with pytest.raises(ValueError, match="must be finite"):
        opt.add_param_group({"params": params(), "weight_decay": math.inf})
    with pytest.raises(TypeError, match="amsgrad"):
        opt.add_param_group({"params": params(), "amsgrad": "yes"})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params(), "lr": 0.0})
    assert len(opt.param_groups) == 2


def test_bridge_valid_edge_values_train():
    p = params()
    opt = tb.SGD(p, lr=torch.tensor(0.5), weight_decay=0)
    p[0].sum().backward()  # gradient 1
    opt.step()
    np.testing.assert_array_equal(p[0].detach().numpy(), -0.5)
    tb.SGD(params(), lr=0)
    tb.Adam(params(), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    tb.Adam(params(), lr=torch.tensor(1e-3), capturable=True, foreach=True)
    tb.ASGD(params(), t0=0.0, alpha=0.0)
    tb.AutoSGM(params(), debias=1, aoptlr=0)  # the reference's 0/1 spellings


# --------------------------------------------------------------------------------------------------
# torch's precedence and messages where torch raises
# --------------------------------------------------------------------------------------------------

TORCH_CASES = [
    ("SGD", dict(lr=-1.0, momentum=-1.0)), ("SGD", dict(momentum=-1.0, weight_decay=-1.0)),
    ("SGD", dict(lr=torch.ones(2))), ("SGD", dict(nesterov=True)),
    ("Adam", dict(lr=-1.0, eps=-1.0)), ("Adam", dict(eps=-1.0, betas=(2.0, 0.999))),
    ("Adam", dict(betas=(0.9, 1.0), weight_decay=-1.0)), ("Adam", dict(weight_decay=-1.0, betas=(0, 0.999))),
    ("Adam", dict(betas=(0, 0.999))), ("Adam", dict(lr=torch.ones(2))),
    ("Adam", dict(lr=torch.tensor(1e-3), foreach=True)),
    ("Adam", dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True)),
    ("Adam", dict(betas=(torch.tensor(0.9), torch.ones(2)))),
    ("Adam", dict(fused=True, foreach=True)),
    ("AdamW", dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True)),
    ("AdamW", dict(lr=-1.0, weight_decay=-1.0)),
    ("ASGD", dict(lr=-1.0, weight_decay=-1.0)), ("ASGD", dict(lr=torch.ones(2))),
]


@pytest.mark.parametrize("cls_name, kwargs", TORCH_CASES, ids=[f"{c}-{sorted(k)}" for c, k in TORCH_CASES])
def test_torch_precedence_and_messages(cls_name, kwargs):
    with pytest.raises(Exception) as want:
        getattr(torch.optim, cls_name)(params(), **kwargs)
    with pytest.raises(type(want.value)) as got:
        getattr(tb, cls_name)(params(), **kwargs)
    assert str(got.value) == str(want.value)


# --------------------------------------------------------------------------------------------------
# the generic JaxOptimizer(params, "name", **kw): the entry's factory validates at construction
# --------------------------------------------------------------------------------------------------


GENERIC_CASES = list(_bad_value_cases(lambda name: "lr" if name == "learning_rate" else name))


@pytest.mark.parametrize("entry_name, key, bad", GENERIC_CASES)
def test_generic_rejects_bad_values(entry_name, key, bad):
    with pytest.raises((ValueError, TypeError)) as err:
        tb.JaxOptimizer(params(), entry_name, **{key: bad})
    assert_clear(err, key)


def test_generic_adam_negative_lr_no_longer_trains_uphill():
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):  # the named class's message
        tb.JaxOptimizer(params(), "adam", lr=-1)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        tb.JaxOptimizer(params(), "adam", lr=torch.ones(2))
    with pytest.raises(ValueError, match="Invalid b2"):
        tb.JaxOptimizer(params(), "adam", b2=1.0)
    opt = tb.JaxOptimizer(params(), "sgd")
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": params(), "momentum": 2.0})
    assert len(opt.param_groups) == 1


def test_generic_valid_edge_values():
    tb.JaxOptimizer(params(), "sgd", lr=0.0, momentum=None, weight_decay=0.0)
    tb.JaxOptimizer(params(), "adam", lr=torch.tensor(1e-3))
    tb.JaxOptimizer(params(), "enhanced_sgd", gradient_centering="all", centering_axis=-1)
    tb.JaxOptimizer(params(), "lookahead_sgd", sync_period=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tb.JaxOptimizer(params(), "elra_math", momentum=None)


def test_table_sizes():
    # every registry entry and every bridge class is in the tables
    assert {c[0] for c in (p.values for p in FACTORY_CASES)} == set(registry.names())
    assert {c[0] for c in (p.values for p in GENERIC_CASES)} == set(registry.names())
    assert {c[0] for c in (p.values for p in BRIDGE_CASES)} == set(BRIDGE) | {"Lookahead"}
    bridge_classes = {n for n in tb.__all__ if inspect.isclass(getattr(tb, n))
                      and issubclass(getattr(tb, n), tb.JaxOptimizer) and n not in ("JaxOptimizer", "ElraOptimizer")}
    assert bridge_classes <= set(BRIDGE) | {"Lookahead"}


# ---- bridge-only arguments: flat, write_back, ElraGradScaler, Lookahead's optimizer ----------------------

@pytest.mark.parametrize("make", [
    lambda p, **kw: tb.SGD(p, lr=0.1, **kw), lambda p, **kw: tb.Adam(p, **kw), lambda p, **kw: tb.AutoSGM(p, **kw),
    lambda p, **kw: tb.ELRA(p, lr=1e-3, **kw), lambda p, **kw: tb.JaxOptimizer(p, "adam", **kw)])
@pytest.mark.parametrize("bad", [1, 0.0, "no", None])
def test_flat_must_be_a_bool(make, bad):
    with pytest.raises(TypeError, match="flat"):
        make([torch.nn.Parameter(torch.zeros(3))], flat=bad)


@pytest.mark.parametrize("bad", [1, None, "COPY"])
def test_write_back_must_be_copy_or_swap(bad):
    with pytest.raises(ValueError, match="write_back"):
        tb.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, write_back=bad)


@pytest.mark.parametrize("key,bad,exc", [
    ("init_scale", math.nan, ValueError), ("init_scale", math.inf, ValueError), ("init_scale", 0.0, ValueError),
    ("init_scale", None, TypeError), ("init_scale", "1", TypeError), ("init_scale", True, TypeError),
    ("growth_factor", math.nan, ValueError), ("growth_factor", 1.0, ValueError), ("growth_factor", "2", TypeError),
    ("growth_factor", None, TypeError), ("backoff_factor", math.nan, ValueError), ("backoff_factor", 1.0, ValueError),
    ("backoff_factor", 0.0, ValueError), ("backoff_factor", None, TypeError), ("growth_interval", 0, ValueError),
    ("growth_interval", 2.5, TypeError), ("growth_interval", None, TypeError), ("growth_interval", True, TypeError),
    ("loss_limit", math.nan, ValueError), ("loss_limit", 0.0, ValueError), ("loss_limit", None, TypeError),
    ("loss_limit", "1", TypeError), ("loss_limit", True, TypeError), ("enabled", 1, TypeError),
    ("enabled", None, TypeError), ("enabled", "no", TypeError)])
def test_elra_grad_scaler_arguments_are_checked(key, bad, exc):
    with pytest.raises(exc, match=key):
        tb.ElraGradScaler(**{key: bad})


def test_elra_grad_scaler_valid_edges():
    s = tb.ElraGradScaler(loss_limit=math.inf, enabled=False, growth_interval=1)
    assert s.loss_limit == math.inf and not s.is_enabled()


@pytest.mark.parametrize("cls", ["Lookahead", "TorchLookahead"])
@pytest.mark.parametrize("bad", [[torch.zeros(2)], "sgd", 3])
def test_lookahead_optimizer_must_be_an_optimizer(cls, bad):
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        getattr(tb.lookahead, cls)(bad)
