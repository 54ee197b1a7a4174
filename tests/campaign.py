"""Bad-input campaign harness (issue 15.6): bad hyperparameters, non-finite gradients and losses, malformed
state dicts, for every registry entry on both backends.

Backends: ``"jax"`` (the registry factories, ``entry.build(...)``; ``init``/``update`` called eagerly on a
two-leaf pytree) and ``"torch"`` (the ``torch_bridge`` classes of ``torch_bridge.__all__`` with their
constructor signatures, and the generic ``torch_bridge.JaxOptimizer(params, name, ...)`` for every entry).

Every case ends in one category:

* ``CLEAR``: ``ValueError`` / ``TypeError`` / ``FloatingPointError`` (``NotImplementedError`` for arguments
  documented as not implemented) raised where the problem is made (construction, ``load_state_dict``,
  the non-finite ``step`` under ``nonfinite="raise"``) whose message names the argument, key or parameter.
* ``POLICY``: documented behaviour, checked: ``nonfinite="propagate"`` matching the torch reference
  (NaN/inf pattern equal, finite values close) or documented propagate for optimizers without one;
  ``nonfinite="skip"`` leaving parameters and state bit-identical and continuing bit for bit as a run that
  never saw the step; a ``UserWarning`` at load where torch.optim accepts silently; a compatibility
  argument documented as ignored whose run is bit-identical to the default run.
* ``SILENT``: accepted (no error) and nothing documented says so: nonsense accepted, a result that differs
  from its reference, a ``skip`` that changed something, a ``raise`` that did not raise.
* ``LATE``: an error, but not a clear one at the right place: another exception type, a message that
  names neither the argument nor the key, or an error only at ``step`` for a construction-time problem.
* ``UNCOVERED``: the ``nonfinite`` option does not exist yet on that factory/class (counted, not failed);
  once the option exists its cases are classified as above and must pass.

Run ``python -m tests.campaign`` for the count table (``--quick`` skips the generic-JaxOptimizer
non-finite cases). ``tests/test_bad_input_campaign.py`` asserts ``SILENT == 0`` and ``LATE == 0``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import sys
import time
import warnings
from collections import Counter
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import torch_bridge as tb
from jaxopt_suite import registry
from jaxopt_suite._common import factory_signature

CLEAR, POLICY, SILENT, LATE, UNCOVERED = "clear", "policy", "silent", "late", "uncovered"
CATEGORIES = (CLEAR, POLICY, SILENT, LATE, UNCOVERED)
CLEAR_TYPES = (ValueError, TypeError, FloatingPointError)
#: Outcomes recorded by the pytest run, for the session summary (tests/conftest.py).
RECORDED: list = []


@dataclasses.dataclass(frozen=True)
class Outcome:
    backend: str   # "jax" | "torch"
    group: str     # "hyper" | "nonfinite" | "state"
    target: str    # registry entry or bridge class (configuration)
    case: str      # argument/kind, scenario/policy, corruption
    category: str
    detail: str = ""

    def __str__(self):
        return f"[{self.backend}/{self.group}] {self.target}: {self.case} -> {self.category.upper()} {self.detail}"


# ------------------------------------------------------------------------------------------------
# messages
# ------------------------------------------------------------------------------------------------

#: Other spellings a message may use for an argument (torch's messages say "learning rate", "beta"...).
ALIASES = {
    "learning_rate": ("lr", "learning rate"), "lr": ("learning rate", "learning_rate"),
    "betas": ("beta",), "b1": ("beta", "betas"), "b2": ("beta", "betas"), "eps": ("epsilon",),
    "k": ("sync_period",), "alpha": ("slow_step_size",), "sync_period": ("k",), "slow_step_size": ("alpha",),
    "clip_lambda": ("clip_value_fn",),
}


def _norm(text: str) -> str:
    return text.lower().replace("_", " ")


def names_any(message: str, names) -> bool:
    """``message`` mentions one of ``names`` as a word (underscores and spaces are the same)."""
    msg = _norm(message)
    for name in names:
        n = _norm(str(name))
        if n and re.search(r"(?<![a-z0-9])" + re.escape(n) + r"(?![a-z0-9])", msg):
            return True
    return False


def arg_names(arg: str, extra=()) -> tuple:
    return (arg, *ALIASES.get(arg, ()), *extra)


def classify_error(exc: BaseException, names, where: str, clear_types=CLEAR_TYPES) -> tuple[str, str]:
    text = f"{type(exc).__name__}: {exc}"
    short = text if len(text) < 160 else text[:157] + "..."
    if isinstance(exc, clear_types) and names_any(str(exc), names):
        return CLEAR, f"{where}: {short}"
    if isinstance(exc, clear_types):
        return LATE, f"{where}, message names none of {list(names)[:3]}: {short}"
    return LATE, f"{where}, unrelated {short}"


# ------------------------------------------------------------------------------------------------
# bad values
# ------------------------------------------------------------------------------------------------

#: Allowed ranges the campaign relies on: (low, low inclusive, high, high inclusive). Only names listed here
#: get the "negative"/"above" draws; every number gets nan, -inf, None (unless None is its default), a
#: string and a bool; +inf only where INF_OK does not list it.
UNIT_OPEN = (0.0, True, 1.0, False)
UNIT = (0.0, True, 1.0, True)
NONNEG = (0.0, True, None, None)
POS = (0.0, False, None, None)
DOMAINS = {
    # torch-semantics family
    "learning_rate": NONNEG, "lr": NONNEG, "eps": NONNEG, "weight_decay": NONNEG, "dampening": NONNEG,
    "momentum": NONNEG, "b1": UNIT_OPEN, "b2": UNIT_OPEN, "lambd": NONNEG, "t0": NONNEG,
    "sync_period": (1.0, True, None, None), "k": (1.0, True, None, None),
    "slow_step_size": UNIT, "alpha_lookahead": UNIT,
    # AutoSGM
    "beta_n": UNIT_OPEN, "beta_a": UNIT_OPEN, "beta_i": UNIT_OPEN, "num_lrc": NONNEG, "wd_level": NONNEG,
    # ELRA
    "warmup": NONNEG, "batch_size": (1.0, True, None, None), "classes": NONNEG,
    # EnhancedSGD
    "smoothing_factor": UNIT, "noise_scale": NONNEG, "entropy_weight": NONNEG, "retention_weight": UNIT,
    "q_learning_rate": UNIT, "q_discount": UNIT, "q_epsilon": UNIT, "q_epsilon_decay": UNIT,
    "q_epsilon_min": UNIT, "q_initial_mix_prob": UNIT, "lookahead_alpha": UNIT,
    "lookahead_k": (1.0, True, None, None), "gradient_buffer_size": (1.0, True, None, None),
    "entropy_bins": (1.0, True, None, None), "max_momentum": UNIT_OPEN, "spike_recovery_steps": NONNEG,
    "bayesian_prior_std": NONNEG,
    # ElraGradScaler
    "init_scale": POS, "growth_factor": (1.0, False, None, None), "backoff_factor": (0.0, False, 1.0, False),
    "growth_interval": (1.0, True, None, None), "loss_limit": POS,
}
#: +inf is a meaningful value here (ASGD's t0: never start averaging; a loss limit that never triggers).
INF_OK = {"t0", "loss_limit", "max_steps"}
#: Integer-valued arguments: also drawn as a non-integral float.
INTEGER = {"num_lrc", "wd_level", "batch_size", "classes", "lookahead_k", "gradient_buffer_size",
           "entropy_bins", "spike_recovery_steps", "seed", "centering_axis", "sync_period", "k",
           "growth_interval", "max_steps"}


def number_bad_values(name: str, default: Any, none_ok: bool = False) -> list[tuple[str, Any]]:
    out = [("nan", float("nan")), ("-inf", float("-inf"))]
    if name not in INF_OK:
        out.append(("+inf", float("inf")))
    dom = DOMAINS.get(name)
    if dom is not None:
        low, low_inc, high, high_inc = dom
        if low is not None:
            out.append(("below range", low - 0.5 if low_inc else low))
        if high is not None:
            out.append(("above range", high + 0.5 if high_inc else high))
    if name in INTEGER:
        out.append(("non-integral", 2.5))
    if not none_ok and default is not None:
        out.append(("None", None))
    out += [("string '0.1'", "0.1"), ("bool True", True)]
    return out


FLAG_BAD = [("int 1", 1), ("float 0.0", 0.0), ("string 'no'", "no"), ("None", None)]
OPTIONAL_FLAG_BAD = [("int 1", 1), ("string 'no'", "no")]
CHOICE_BAD = [("unknown choice", "bogus"), ("int 3", 3), ("None", None)]


def tuple_bad_values(default: tuple) -> list[tuple[str, Any]]:
    out = [("None", None), ("string", "0.5")]
    for i, v in enumerate(default):
        if isinstance(v, bool):
            out.append((f"[{i}] string 'no'", tuple("no" if j == i else w for j, w in enumerate(default))))
        elif isinstance(v, (int, float)):
            out.append((f"[{i}] nan", tuple(float("nan") if j == i else w for j, w in enumerate(default))))
            out.append((f"[{i}] string", tuple("0.1" if j == i else w for j, w in enumerate(default))))
    return out


def bad_values_for(name: str, default: Any, *, none_ok: bool = False) -> list[tuple[str, Any]]:
    """Every bad kind that applies to an argument with this name and default."""
    if isinstance(default, bool):
        return list(FLAG_BAD)
    if isinstance(default, str):
        return list(CHOICE_BAD)
    if isinstance(default, tuple):
        return tuple_bad_values(default)
    if isinstance(default, (int, float)) or default is None:
        return number_bad_values(name, default, none_ok=none_ok)
    return []


# ------------------------------------------------------------------------------------------------
# shared problem: two leaves, deterministic gradients
# ------------------------------------------------------------------------------------------------

W0 = np.array([[0.5, -1.0, 2.0], [0.25, -0.75, 1.5]], np.float32)
B0 = np.array([0.3, -0.2], np.float32)


def grads_at(k: int, bad: Optional[str] = None):
    """Gradients of step ``k`` (0-based); ``bad``: 'nan' / 'inf' in element [0, 1] of the weight."""
    gw = (np.cos(W0 * (k + 1)) * (1 + 0.1 * k)).astype(np.float32)
    gb = (np.sin(B0 * (k + 2)) + 0.1).astype(np.float32)
    if bad is not None:
        gw[0, 1] = float(bad)
    return gw, gb


def loss_at(k: int, bad: Optional[str] = None) -> float:
    return float(bad) if bad is not None else 2.0 / (k + 1) + 0.5


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_pattern(a, b, rtol=1e-5, atol=1e-6) -> bool:
    """NaN/±inf at the same places, finite values close (the propagate parity check)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    for test in (np.isnan, np.isposinf, np.isneginf):
        if not np.array_equal(test(a), test(b)):
            return False
    fin = np.isfinite(a)
    return bool(np.allclose(a[fin], b[fin], rtol=rtol, atol=atol))


# ------------------------------------------------------------------------------------------------
# JAX backend
# ------------------------------------------------------------------------------------------------

SKIP_JAX_ARGS = {"segments", "weight_decay_mask", "window", "nonfinite"}


def jax_params():
    return {"w": jnp.asarray(W0), "b": jnp.asarray(B0)}


def jax_step(tx, state, params, k, entry, bad=None, bad_loss=None):
    gw, gb = grads_at(k, bad)
    extra = {"value": jnp.asarray(loss_at(k, bad_loss), jnp.float32)} if entry.requires_value else {}
    updates, state = tx.update({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params, **extra)
    return optax.apply_updates(params, updates), state


def all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def factory_args(entry):
    """``(name, default, none_ok, is_callable)`` for each drawn argument of the entry's factory (the entry's
    kwargs override the defaults; ``none_ok``: None is the documented default, e.g. momentum=None: no buffer)."""
    sig = factory_signature(entry.factory)
    for name, par in sig.parameters.items():
        if name in SKIP_JAX_ARGS or par.kind in (par.VAR_KEYWORD, par.VAR_POSITIONAL):
            continue
        default = entry.kwargs.get(name, par.default)
        is_callable = callable(default) and not isinstance(default, (bool, int, float))
        yield name, default, par.default is None, is_callable


def jax_hyper_cases(entry):
    for name, default, none_ok, is_callable in factory_args(entry):
        if is_callable:
            yield name, "string", "clip"
            continue
        for kind, value in bad_values_for(name, default, none_ok=none_ok):
            yield name, kind, value


def run_jax_hyper(entry, arg, kind, value) -> Outcome:
    def out(cat, detail):
        return Outcome("jax", "hyper", entry.name, f"{arg}={kind}", cat, detail)
    try:
        tx = entry.build(**{arg: value})
    except Exception as exc:  # noqa: BLE001 - classified
        return out(*classify_error(exc, arg_names(arg), "construction"))
    try:
        params = jax_params()
        state = tx.init(params)
        params, state = jax_step(tx, state, params, 0, entry)
    except Exception as exc:  # noqa: BLE001
        return out(LATE, f"accepted at construction, {type(exc).__name__} at init/update: {str(exc)[:120]}")
    return out(SILENT, f"accepted; first update {'finite' if all_finite(params) else 'NON-FINITE'}")


# ------------------------------------------------------------------------------------------------
# torch backend: construction
# ------------------------------------------------------------------------------------------------

#: Arguments documented as accepted-and-ignored for compatibility with a reference package (docstrings of
#: torch_bridge.elra.ELRA and torch_bridge.enhanced_sgd): a bad value is POLICY when the run is bit-identical
#: to the default run.
IGNORED_COMPAT = {"ELRA": {"model", "mode", "dummy"}, "ElraOptimizer": {"model", "mode", "dummy"},
                  "EnhancedSGD": {"model", "decay", "usage_case", "max_steps"}}
#: Torch-side flags whose default None means "torch decides" (torch.optim's own meaning).
OPTIONAL_FLAGS = {"foreach", "fused", "decoupled_weight_decay"}
#: torch.optim's implementation flags: torch's own errors for them are RuntimeError.
TORCH_IMPL_FLAGS = {"foreach", "fused", "differentiable", "capturable"}
SKIP_TORCH_ARGS = {"self", "params", "optimizer", "defaults", "keywords", "hyperparams", "model",
                   "layer_type_scaling", "device"}


def torch_params():
    return [torch.tensor(W0).requires_grad_(True), torch.tensor(B0).requires_grad_(True)]


def needs_value(opt) -> bool:
    inner = getattr(opt, "optimizer", None)
    if isinstance(opt, (tb.ELRA, tb.EnhancedSGD)):
        return True
    if isinstance(opt, tb.JaxOptimizer) and isinstance(opt._entry_name, str):
        return registry.get(opt._entry_name).requires_value
    return inner is not None and needs_value(inner)


def torch_step(opt, params, k, bad=None, bad_loss=None):
    """One step with gradients ``grads_at(k)`` through backward (the bridge marks params by hook)."""
    gw, gb = grads_at(k, bad)
    opt.zero_grad()
    loss = (params[0] * torch.tensor(gw)).sum() + (params[1] * torch.tensor(gb)).sum()
    loss.backward()
    if isinstance(opt, tb.JaxOptimizer) and needs_value(opt):
        opt.step(value=loss_at(k, bad_loss))
    else:
        opt.step()


def torch_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def _class_args(cls):
    sig = inspect.signature(cls.__init__)
    for name, par in sig.parameters.items():
        if name in SKIP_TORCH_ARGS or par.kind in (par.VAR_KEYWORD, par.VAR_POSITIONAL):
            continue
        yield name, par.default


def _torch_bad_values(cls_name, name, default):
    if name in OPTIONAL_FLAGS:
        return list(OPTIONAL_FLAG_BAD)
    if name in ("capturable", "differentiable", "dbg", "grad_cam_scaling"):
        return list(FLAG_BAD)
    if name == "clip_lambda":
        return [("string", "clip"), ("int 3", 3)]
    if name in ("mode", "dummy"):
        return [("string", "bogus")]
    if name == "momentum" and cls_name in ("ELRA", "ElraOptimizer"):
        return number_bad_values(name, default, none_ok=True)
    if name in ("seed", "lr") and default is None:  # None: drawn from torch's generator / from lr_cfg
        return [(k, v) for k, v in number_bad_values(name, 0) if v is not None]
    dom_name = "alpha_lookahead" if (cls_name.endswith("Lookahead") and name == "alpha") else name
    values = bad_values_for(dom_name, default)
    return values


#: The bridge classes, each with a builder taking (params, **kwargs); wrappers build their inner optimizer.
def torch_class_builders() -> dict[str, Callable]:
    out = {}
    for name in tb.__all__:
        obj = getattr(tb, name)
        if not inspect.isclass(obj) or name == "JaxOptimizer":
            continue
        if name == "Lookahead":
            out[name] = lambda p, **kw: tb.Lookahead(tb.SGD(p, lr=0.1, momentum=0.9), **kw)
        elif name == "TorchLookahead":
            out[name] = lambda p, **kw: tb.TorchLookahead(torch.optim.SGD(p, lr=0.1, momentum=0.9), **kw)
        elif name == "ElraGradScaler":
            out[name] = lambda p, **kw: tb.ElraGradScaler(**kw)
        elif name == "EnhancedSGD":
            out[name] = lambda p, **kw: tb.EnhancedSGD(p, **{"seed": 0, **kw})
        else:
            out[name] = (lambda c: lambda p, **kw: c(p, **kw))(obj)
    return out


def torch_hyper_cases():
    """(target, arg, kind, value, builder, names that a clear message may use, extra note)."""
    builders = torch_class_builders()
    for cls_name, build in builders.items():
        cls = getattr(tb, cls_name)
        extra = ()
        entry_names = [e for e in registry.entries() if e.torch_bridge_class == cls_name]
        if cls_name == "AutoSGM":  # the cfg tuples hold the factory's arguments by position
            extra = tuple(factory_signature(registry.get("autosgm_adam").factory).parameters) + (
                "aoptlr", "rcm", "inseq", "tau", "spe", "cfact")  # the cfg fields (torch_bridge/autosgm.py)
        for arg, default in _class_args(cls):
            for kind, value in _torch_bad_values(cls_name, arg, default):
                yield cls_name, arg, kind, value, build, arg_names(arg, extra)
        if cls_name in ("Lookahead", "TorchLookahead"):
            yield cls_name, "optimizer", "not an optimizer", None, \
                (lambda c: lambda p, **kw: c([1, 2]))(cls), ("optimizer",)
        del entry_names
    # generic JaxOptimizer: the factory's arguments (lr for learning_rate), for every entry
    for entry in registry.entries():
        for name, default, none_ok, is_callable in factory_args(entry):
            if is_callable:
                continue
            key = "lr" if name == "learning_rate" else name
            for kind, value in bad_values_for(name, default, none_ok=none_ok):
                yield (f"JaxOptimizer[{entry.name}]", key, kind, value,
                       (lambda n: lambda p, **kw: tb.JaxOptimizer(p, n, **kw))(entry.name), arg_names(key))
    generic = lambda p, **kw: tb.JaxOptimizer(p, "adam", **kw)  # noqa: E731
    for kind, value in FLAG_BAD:
        yield "JaxOptimizer[adam]", "flat", kind, value, generic, ("flat",)
    for kind, value in CHOICE_BAD:
        yield "JaxOptimizer[adam]", "write_back", kind, value, generic, ("write_back",)
    yield ("JaxOptimizer", "optimizer", "unknown name", "bogus",
           lambda p, **kw: tb.JaxOptimizer(p, "bogus"), ("bogus", "optimizer"))


def _run_default(build, steps=2):
    params = torch_params()
    opt = build(params)
    for k in range(steps):
        torch_step(opt, params, k)
    return [p.detach().clone() for p in params]


def run_torch_hyper(target, arg, kind, value, build, names) -> Outcome:
    def out(cat, detail):
        return Outcome("torch", "hyper", target, f"{arg}={kind}", cat, detail)
    params = torch_params()
    clear_types = CLEAR_TYPES + (NotImplementedError,) if arg == "grad_cam_scaling" else CLEAR_TYPES
    if arg in TORCH_IMPL_FLAGS:  # torch.optim raises RuntimeError for these (e.g. "`fused` is not supported")
        clear_types = CLEAR_TYPES + (RuntimeError,)
    if arg == "optimizer" and target == "JaxOptimizer":
        clear_types = CLEAR_TYPES + (KeyError,)
    kwargs = {} if arg == "optimizer" else {arg: value}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = build(params, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return out(*classify_error(exc, names, "construction", clear_types))
    if target == "ElraGradScaler":
        return out(SILENT, "accepted (a GradScaler: no step to run)")
    try:
        for k in range(2):
            torch_step(opt, params, k)
    except Exception as exc:  # noqa: BLE001
        return out(LATE, f"accepted at construction, {type(exc).__name__} at step: {str(exc)[:120]}")
    if arg in IGNORED_COMPAT.get(target, ()):
        ref = _run_default(build)
        if all(torch.equal(a, b) for a, b in zip(ref, params)):
            return out(POLICY, "documented as accepted and ignored; bit-identical to the default run")
        return out(SILENT, "documented as ignored but changes the result")
    return out(SILENT, f"accepted; params after 2 steps {'finite' if torch_finite(params) else 'NON-FINITE'}")


# ------------------------------------------------------------------------------------------------
# non-finite gradients and losses
# ------------------------------------------------------------------------------------------------

N_STEPS = 4
#: (scenario, step index of the bad input, bad gradient element, bad loss)
SCENARIOS = [("grad nan @1", 0, "nan", None), ("grad inf @3", 2, "inf", None),
             ("loss nan @1", 0, None, "nan"), ("loss inf @3", 2, None, "inf")]
POLICIES = ("propagate", "skip", "raise")
#: torch references reproduced by the entries/classes (torch_semantics.md): (torch class, kwargs).
TORCH_REFS = {"sgd": ("SGD", dict(lr=0.1, momentum=0.9)), "adam": ("Adam", dict(lr=1e-2)),
              "adamw": ("AdamW", dict(lr=1e-2)), "asgd": ("ASGD", dict(lr=1e-2)),
              "adopt": ("adopt.ADOPT", dict(lr=1e-2))}
JAX_REF_KWARGS = {"sgd": dict(learning_rate=0.1, momentum=0.9), "adam": dict(learning_rate=1e-2),
                  "adamw": dict(learning_rate=1e-2), "asgd": dict(learning_rate=1e-2),
                  "adopt": dict(learning_rate=1e-2)}


def _torch_reference_run(name, bad_step, bad, bad_loss):
    cls_name, kw = TORCH_REFS[name]
    if "." in cls_name:
        module, attr = cls_name.split(".")
        cls = getattr(__import__(module), attr)
    else:
        cls = getattr(torch.optim, cls_name)
    params = torch_params()
    opt = cls(params, **kw)
    for k in range(N_STEPS):
        torch_step(opt, params, k, bad if k == bad_step else None)
    return [p.detach().numpy().copy() for p in params]


def has_nonfinite(fn) -> bool:
    try:
        return "nonfinite" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _state_leaves(state):
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in flat]


def _same_state(a, b) -> Optional[str]:
    """None when the JAX states are bit-identical except the skip counter, else the first differing path."""
    la, lb = _state_leaves(a), _state_leaves(b)
    if [p for p, _ in la] != [p for p, _ in lb]:
        return "structure"
    for (path, x), (_, y) in zip(la, lb):
        if "skips" in path:
            continue
        if not bits_equal(x, y):
            return path
    return None


_JITTED: dict = {}


def jitted_update(entry, kw):
    """``tx.update`` of ``entry.build(**kw)`` under ``jit``, one compile per (entry, kwargs) for all scenarios."""
    key = (entry.name, tuple(sorted(kw.items())))
    if key not in _JITTED:
        tx = entry.build(**kw)

        def update(grads, state, params, value):
            extra = {"value": value} if entry.requires_value else {}
            return tx.update(grads, state, params, **extra)
        _JITTED[key] = (tx, jax.jit(update))
    return _JITTED[key]


def fast_step(fn, state, params, k, bad=None, bad_loss=None):
    gw, gb = grads_at(k, bad)
    updates, state = fn({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params,
                        jnp.asarray(loss_at(k, bad_loss), jnp.float32))
    return optax.apply_updates(params, updates), state


def nonfinite_scenarios(requires_value):
    return [s for s in SCENARIOS if s[3] is None or requires_value]


def run_jax_nonfinite(entry, policy, scenario) -> Outcome:
    label, bad_step, bad, bad_loss = scenario

    def out(cat, detail):
        return Outcome("jax", "nonfinite", entry.name, f"{label} nonfinite={policy}", cat, detail)
    option = has_nonfinite(entry.factory)
    if policy != "propagate" and not option:
        return out(UNCOVERED, "no nonfinite option")
    kw = dict(JAX_REF_KWARGS.get(entry.name, {}))
    if option:
        kw["nonfinite"] = policy
    try:
        params = jax_params()
        if policy == "raise":  # the check runs eagerly; the steps before it run jitted where the state allows
            tx = entry.build(**kw)
            state = tx.init(params)
            pre_kw = {**kw, "nonfinite": "propagate"}
            pre_tx, pre_fn = jitted_update(entry, pre_kw)
            same = jax.tree.structure(pre_tx.init(params)) == jax.tree.structure(state)
            for k in range(bad_step):
                params, state = fast_step(pre_fn, state, params, k) if same else \
                    jax_step(tx, state, params, k, entry)
            try:
                jax_step(tx, state, params, bad_step, entry, bad, bad_loss)
            except Exception as exc:  # noqa: BLE001
                names = ("loss", "value") if bad_loss else ("w", "gradient leaf")
                return out(*classify_error(exc, names, "update"))
            return out(SILENT, "nonfinite='raise' did not raise")
        tx, fn = jitted_update(entry, kw)
        state = tx.init(params)
        for k in range(bad_step):
            params, state = fast_step(fn, state, params, k)
        before_p, before_s = params, state
        params, state = fast_step(fn, state, params, bad_step, bad, bad_loss)
        if policy == "skip":
            if not all(bits_equal(params[n], before_p[n]) for n in params):
                return out(SILENT, "skip changed the parameters")
            diff = _same_state(state, before_s)
            if diff is not None:
                return out(SILENT, f"skip changed the state at {diff}")
        for k in range(bad_step + 1, N_STEPS):
            params, state = fast_step(fn, state, params, k)
    except Exception as exc:  # noqa: BLE001
        return out(LATE, f"{type(exc).__name__}: {str(exc)[:140]}")
    if policy == "skip":
        # a run with the step skipped continues exactly as one that never saw it
        p2 = jax_params()
        s2 = tx.init(p2)
        for k in [k for k in range(N_STEPS) if k != bad_step]:
            p2, s2 = fast_step(fn, s2, p2, k)
        if not all(bits_equal(params[n], p2[n]) for n in params):
            return out(SILENT, "after the skipped step the run differs from one that never saw it")
        return out(POLICY, "skip: bit-identical, continues as if never seen")
    if entry.name in TORCH_REFS and bad_loss is None:
        ref = _torch_reference_run(entry.name, bad_step, bad, bad_loss)
        if same_pattern(params["w"], ref[0]) and same_pattern(params["b"], ref[1]):
            return out(POLICY, f"propagate matches {TORCH_REFS[entry.name][0]}")
        return out(SILENT, f"propagate differs from {TORCH_REFS[entry.name][0]}")
    if option:
        return out(POLICY, "documented propagate (docs/optimizers.md, Non-finite gradients); no error")
    return out(UNCOVERED, "propagate ran without error; no reference and no documented policy yet")


#: Bridge configurations stepped in the non-finite campaign: builder (params, **kw) and torch reference.
def torch_nonfinite_targets(generic: bool = True):
    out = {
        "SGD": (lambda p, **kw: tb.SGD(p, lr=0.1, momentum=0.9, **kw), "sgd"),
        "Adam": (lambda p, **kw: tb.Adam(p, lr=1e-2, **kw), "adam"),
        "AdamW": (lambda p, **kw: tb.AdamW(p, lr=1e-2, **kw), "adamw"),
        "ADOPT": (lambda p, **kw: tb.ADOPT(p, lr=1e-2, **kw), "adopt"),
        "ASGD": (lambda p, **kw: tb.ASGD(p, lr=1e-2, **kw), "asgd"),
        "ASGD-momentum": (lambda p, **kw: tb.ASGD(p, lr=1e-2, momentum=0.9, **kw), None),
        "AutoSGM": (lambda p, **kw: tb.AutoSGM(p, **kw), None),
        "ELRA": (lambda p, **kw: tb.ELRA(p, lr=1e-3, **kw), None),
        "ELRA-dnn": (lambda p, **kw: tb.ELRA(p, lr=1e-3, classes=10, **kw), None),
        "ElraOptimizer": (lambda p, **kw: tb.ElraOptimizer(p, lr=1e-3, **kw), None),
        "EnhancedSGD": (lambda p, **kw: tb.EnhancedSGD(p, seed=0, **kw), None),
        "Lookahead-SGD": (lambda p, **kw: tb.Lookahead(tb.SGD(p, lr=0.1, momentum=0.9, **kw), k=3,
                                                        **_lookahead_kw(kw)), None),
        "Lookahead-Adam": (lambda p, **kw: tb.Lookahead(tb.Adam(p, lr=1e-2, **kw), k=3,
                                                         **_lookahead_kw(kw)), None),
    }
    if generic:
        for entry in registry.entries():
            out[f"JaxOptimizer[{entry.name}]"] = (
                (lambda n, kw0: lambda p, **kw: tb.JaxOptimizer(p, n, **{**kw0, **kw}))(
                    entry.name, {("lr" if k == "learning_rate" else k): v
                                 for k, v in JAX_REF_KWARGS.get(entry.name, {}).items()}),
                entry.name if entry.name in TORCH_REFS else None)
    return out


def _lookahead_kw(kw):
    return {k: v for k, v in kw.items() if has_nonfinite(tb.Lookahead.__init__)}


def _bridge_has_option(target, build) -> bool:
    if target.startswith("JaxOptimizer["):
        return has_nonfinite(registry.get(target[13:-1]).factory)
    cls = {"Lookahead-SGD": tb.SGD, "Lookahead-Adam": tb.Adam}.get(target) or getattr(tb, target.split("-")[0])
    return has_nonfinite(cls.__init__)


def _sd_bits(sd) -> dict:
    """Per-parameter state as comparable bytes (NaN-safe)."""
    out = {}
    for k, st in sd["state"].items():
        for key, v in (st.items() if isinstance(st, dict) else [("", st)]):
            out[(k, key)] = (v.detach().cpu().numpy().tobytes(), str(v.dtype), tuple(v.shape)) \
                if torch.is_tensor(v) else repr(v)
    return out


def _bits(v):
    """A value as comparable bytes: tensors by content (NaN-safe, any size), the rest by repr."""
    if torch.is_tensor(v):
        return (v.detach().cpu().numpy().tobytes(), str(v.dtype), tuple(v.shape))
    if isinstance(v, (list, tuple)):
        return tuple(_bits(x) for x in v)
    return repr(v)


def _groups_wo_skips(sd):
    """The param groups but ``nonfinite_skips``, comparable bitwise (the generic class keeps its global
    state there as tensors: a multi-element tensor has no truth value and NaN != NaN under ``==``)."""
    return [{k: _bits(v) for k, v in g.items() if k != "nonfinite_skips"} for g in sd["param_groups"]]


def run_torch_nonfinite(target, build, ref_name, policy, scenario, requires_value) -> Outcome:
    label, bad_step, bad, bad_loss = scenario

    def out(cat, detail):
        return Outcome("torch", "nonfinite", target, f"{label} nonfinite={policy}", cat, detail)
    option = _bridge_has_option(target, build)
    if policy != "propagate" and not option:
        return out(UNCOVERED, "no nonfinite option")
    kw = {"nonfinite": policy} if option else {}
    try:
        params = torch_params()
        opt = build(params, **kw)
        for k in range(bad_step):
            torch_step(opt, params, k)
        before_p = [p.detach().clone() for p in params]
        before_sd = copy.deepcopy(opt.state_dict())
        if policy == "raise":
            try:
                torch_step(opt, params, bad_step, bad, bad_loss)
            except Exception as exc:  # noqa: BLE001
                names = ("loss",) if bad_loss else ("parameter 0", "(2, 3)")
                cat, detail = classify_error(exc, names, "step")
                if cat == CLEAR and not all(bits_equal(a.detach(), b) for a, b in zip(params, before_p)):
                    return out(SILENT, "raised but modified the parameters")
                return out(cat, detail)
            return out(SILENT, "nonfinite='raise' did not raise")
        torch_step(opt, params, bad_step, bad, bad_loss)
        if policy == "skip":
            if not all(bits_equal(a.detach(), b) for a, b in zip(params, before_p)):
                return out(SILENT, "skip changed the parameters")
            after_sd = opt.state_dict()
            if _sd_bits(after_sd) != _sd_bits(before_sd) and before_sd["state"]:
                return out(SILENT, "skip changed the state")
            if before_sd["state"] and _groups_wo_skips(after_sd) != _groups_wo_skips(before_sd):
                return out(SILENT, "skip changed the param groups beyond nonfinite_skips")
        for k in range(bad_step + 1, N_STEPS):
            torch_step(opt, params, k)
    except Exception as exc:  # noqa: BLE001
        return out(LATE, f"{type(exc).__name__}: {str(exc)[:140]}")
    if policy == "skip":
        p2 = torch_params()
        opt2 = build(p2, **kw)
        for k in [k for k in range(N_STEPS) if k != bad_step]:
            torch_step(opt2, p2, k)
        if not all(torch.equal(a, b) for a, b in zip(params, p2)):
            return out(SILENT, "after the skipped step the run differs from one that never saw it")
        return out(POLICY, "skip: bit-identical, continues as if never seen")
    if ref_name is not None and bad_loss is None:
        ref = _torch_reference_run(ref_name, bad_step, bad, bad_loss)
        if all(same_pattern(p.detach().numpy(), r) for p, r in zip(params, ref)):
            return out(POLICY, f"propagate matches {TORCH_REFS[ref_name][0]}")
        return out(SILENT, f"propagate differs from {TORCH_REFS[ref_name][0]}")
    if option:
        return out(POLICY, "documented propagate (docs/bridge.md, Non-finite gradients); no error")
    return out(UNCOVERED, "propagate ran without error; no reference and no documented policy yet")


# ------------------------------------------------------------------------------------------------
# malformed state dicts (torch backend)
# ------------------------------------------------------------------------------------------------

STATE_TARGETS = {
    "SGD": lambda p: tb.SGD(p, lr=0.1, momentum=0.9, dampening=0.1),
    "Adam": lambda p: tb.Adam(p, lr=1e-2),
    "AdamW": lambda p: tb.AdamW(p, lr=1e-2),
    "ADOPT": lambda p: tb.ADOPT(p, lr=1e-2),
    "ASGD": lambda p: tb.ASGD(p, lr=1e-2),
    "AutoSGM": lambda p: tb.AutoSGM(p),
    "ELRA": lambda p: tb.ELRA(p, lr=1e-3),
    "ElraOptimizer": lambda p: tb.ElraOptimizer(p, lr=1e-3, classes=10),
    "EnhancedSGD": lambda p: tb.EnhancedSGD(p, seed=0),
    "Lookahead": lambda p: tb.Lookahead(tb.Adam(p, lr=1e-2), k=3),
    "TorchLookahead": lambda p: tb.TorchLookahead(torch.optim.SGD(p, lr=0.1, momentum=0.9), k=3),
    "JaxOptimizer[adam]": lambda p: tb.JaxOptimizer(p, "adam"),
    "JaxOptimizer[autosgm_hb]": lambda p: tb.JaxOptimizer(p, "autosgm_hb"),
    "JaxOptimizer[lookahead_sgd]": lambda p: tb.JaxOptimizer(p, "lookahead_sgd"),
}
#: state dicts of one family are partly each other's format on purpose (torch_bridge/optimizer.py docstring)
FAMILY = {"Adam": "adam", "AdamW": "adam", "JaxOptimizer[adam]": "adam", "ELRA": "elra",
          "ElraOptimizer": "elra", "Lookahead": "adam"}
#: torch.optim accepts these silently; the bridge warns (torch_bridge/optimizer.py module docstring)
TORCH_SILENT_WARN = {("SGD", "missing 'momentum_buffer'")}

_TRAINED: dict = {}


def trained_sd(name):
    if name not in _TRAINED:
        params = torch_params()
        opt = STATE_TARGETS[name](params)
        for k in range(2):
            torch_step(opt, params, k)
        _TRAINED[name] = opt.state_dict()
    return copy.deepcopy(_TRAINED[name])


def state_corruptions(name):
    """(case, corrupted state dict, names a clear message uses)."""
    sd = trained_sd(name)
    st0 = sd["state"].get(0, {})
    for key in list(st0):
        bad = copy.deepcopy(sd)
        del bad["state"][0][key]
        yield f"missing {key!r}", bad, (repr(key),)
    bad = copy.deepcopy(sd)
    bad["state"].setdefault(1, {})["not_a_state_key"] = torch.zeros(2)
    yield "extra key", bad, ("'not_a_state_key'",)
    for key, v in st0.items():
        if torch.is_tensor(v) and v.dim() > 0:
            bad = copy.deepcopy(sd)
            bad["state"][0][key] = torch.zeros(3, 2)
            yield f"wrong shape {key!r}", bad, (repr(key),)
            bad = copy.deepcopy(sd)
            bad["state"][0][key] = (v * 4).round().to(torch.int32)
            yield f"wrong dtype {key!r} (int32)", bad, (repr(key),)
            bad = copy.deepcopy(sd)
            bad["state"][0][key] = v.tolist()
            yield f"not a tensor {key!r} (list)", bad, (repr(key),)
            bad = copy.deepcopy(sd)
            bad["state"][0][key] = v.to(torch.complex64) + 1j
            yield f"wrong dtype {key!r} (complex64)", bad, (repr(key),)
            break
    for key in [k for k in sd["state"] if isinstance(k, str)]:  # global (non-parameter) state
        bad = copy.deepcopy(sd)
        del bad["state"][key]
        yield f"missing global {key!r}", bad, (repr(key),)
    bad = copy.deepcopy(sd)
    bad["param_groups"] = bad["param_groups"] * 2
    yield "wrong group count", bad, ("parameter groups",)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:1]
    yield "wrong group size", bad, ("size", "group")
    for other in STATE_TARGETS:
        if other == name or FAMILY.get(other, other) == FAMILY.get(name, name):
            continue
        yield f"state dict of {other}", trained_sd(other), ("load_state_dict",)


def run_state_case(name, case, bad, names) -> Outcome:
    def out(cat, detail):
        return Outcome("torch", "state", name, case, cat, detail)
    params = torch_params()
    opt = STATE_TARGETS[name](params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt.load_state_dict(bad)
        except Exception as exc:  # noqa: BLE001
            return out(*classify_error(exc, names, "load_state_dict"))
    ours = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    try:
        for k in range(2):
            torch_step(opt, params, k)
    except Exception as exc:  # noqa: BLE001
        return out(LATE, f"loaded, {type(exc).__name__} at step: {str(exc)[:120]}")
    if ours:
        return out(POLICY, f"torch accepts; bridge warns: {ours[0][:100]}")
    if "(int32)" in case:
        # torch.optim casts floating state to the parameter's dtype (an integer tensor too): the documented
        # policy is to do the same, so the run must equal the one from the state cast by hand
        fixed = copy.deepcopy(bad)
        for st in fixed["state"].values():
            for k, v in list(st.items()) if isinstance(st, dict) else []:
                if torch.is_tensor(v) and v.dtype == torch.int32 and k != "step":
                    st[k] = v.to(torch.float32)
        ref = torch_params()
        opt2 = STATE_TARGETS[name](ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt2.load_state_dict(fixed)
        for k in range(2):
            torch_step(opt2, ref, k)
        if all(torch.equal(a, b) for a, b in zip(params, ref)):
            return out(POLICY, "cast to the parameter dtype as torch.optim casts it; identical to the cast state")
        return out(SILENT, "integer state accepted and not cast as torch casts it")
    finite = "finite" if torch_finite(params) else "NON-FINITE"
    return out(SILENT, f"accepted without error or warning; params {finite}")


# ------------------------------------------------------------------------------------------------
# the campaign
# ------------------------------------------------------------------------------------------------

def campaign_hyper_jax() -> list[Outcome]:
    return [run_jax_hyper(e, a, k, v) for e in registry.entries() for a, k, v in jax_hyper_cases(e)]


def campaign_hyper_torch() -> list[Outcome]:
    return [run_torch_hyper(*case) for case in torch_hyper_cases()]


def campaign_nonfinite_jax() -> list[Outcome]:
    return [run_jax_nonfinite(e, pol, sc) for e in registry.entries()
            for sc in nonfinite_scenarios(e.requires_value) for pol in POLICIES]


def _target_requires_value(target):
    return target.startswith(("ELRA", "ElraOptimizer", "EnhancedSGD")) or (
        target.startswith("JaxOptimizer[") and registry.get(target[13:-1]).requires_value)


def campaign_nonfinite_torch(generic: bool = True) -> list[Outcome]:
    out = []
    for target, (build, ref) in torch_nonfinite_targets(generic).items():
        rv = _target_requires_value(target)
        for sc in nonfinite_scenarios(rv):
            for pol in POLICIES:
                out.append(run_torch_nonfinite(target, build, ref, pol, sc, rv))
    return out


def campaign_state() -> list[Outcome]:
    return [run_state_case(name, *c) for name in STATE_TARGETS for c in state_corruptions(name)]


def table(outcomes) -> str:
    rows = Counter()
    for o in outcomes:
        rows[(o.backend, o.group, o.category)] += 1
        rows[(o.backend, "all", o.category)] += 1
    keys = sorted({(o.backend, o.group) for o in outcomes}) + sorted({(o.backend, "all") for o in outcomes})
    head = f"{'backend':8}{'group':11}{'tried':>7}" + "".join(f"{c:>10}" for c in CATEGORIES)
    lines = [head, "-" * len(head)]
    for b, g in keys:
        counts = [rows[(b, g, c)] for c in CATEGORIES]
        lines.append(f"{b:8}{g:11}{sum(counts):7d}" + "".join(f"{n:10d}" for n in counts))
    return "\n".join(lines)


def run_all(generic_nonfinite: bool = True, verbose: bool = False) -> list[Outcome]:
    torch.set_num_threads(1)
    outcomes = []
    for name, fn in [("hyper/jax", campaign_hyper_jax), ("hyper/torch", campaign_hyper_torch),
                     ("nonfinite/jax", campaign_nonfinite_jax),
                     ("nonfinite/torch", lambda: campaign_nonfinite_torch(generic_nonfinite)),
                     ("state/torch", campaign_state)]:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fn()
        outcomes += got
        if verbose:
            print(f"{name}: {len(got)} cases in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return outcomes


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    t0 = time.perf_counter()
    results = run_all(generic_nonfinite=not quick, verbose=True)
    if "--list" in sys.argv:
        for o in results:
            if o.category in (SILENT, LATE) or "--all" in sys.argv:
                print(o)
    print(table(results))
    print(f"{len(results)} cases in {time.perf_counter() - t0:.1f} s")
