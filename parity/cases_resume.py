"""Exact resume across backends: train in one framework, convert the optimizer state, continue in the other.

For every registry entry and both directions, on the ``mlp`` problem (8-16-1 tanh, each framework's autograd):

* ``resume_<entry>_torch2jax_*``: N steps through the entry's ``torch_bridge`` class on torch parameters in
  torch's layout (2-D weights stored ``(out, in)`` as in ``nn.Linear``), then
  :func:`torch_bridge.checkpoint.to_optax` (with the mapping ``w ↔ (1, 0)``) and M steps of the registry
  transformation in JAX;
* ``resume_<entry>_jax2torch_*``: N steps in JAX, :func:`torch_bridge.checkpoint.to_torch` into a fresh bridge
  optimizer on the transposed torch parameters (``load_state_dict``), M steps in torch;

each compared with N + M uninterrupted JAX steps of the same entry from the same start (``ours``). Each row
also checks that the converted state converts back to itself (into a fresh bridge optimizer's state dict, or
back to the JAX state): bitwise, PRNG keys and global controller state included, except AutoSGM's
γ_i = 0 filter state, which crosses as S_t/β_i (within 4 ulp). The torch
phase computes its gradient with torch autograd, so the two runs differ by the frameworks' autograd rounding
(and, for optimizers with reductions, by the summation order of a transposed tensor): float64 rows must agree
to 1e-12 relative, float32 rows to the project's float32 JAX ⇄ bridge bar (1e-5 relative). The known-wrong
variant of each float64 torch -> JAX row resumes *without* the optimizer state (a fresh ``init`` at the
switch), which must be at least 10x the tolerance away: the comparison sees a lost state. The float64 rows run in the
default test suite (about 1 s each, mostly compiles); the float32 rows are ``slow`` (``python -m parity``
runs them, as does ``pytest -m slow``).

EnhancedSGD draws its noise per leaf (one key per leaf index) and per element position, and centres along an
axis: it resumes exactly only with the same leaf order and layout on both sides, so its torch phase keeps the
JAX layout and the JAX leaf order (sorted names). With the torch layout the converted state is still exact
(checked in ``tests/torch_bridge/test_checkpoint.py``), but the noise lands on other elements and the
continuation is another valid trajectory, not this one.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from . import problems as P
from .references import Reference, Side, _JaxSide
from .runner import ParityCase

N_FIRST = 3  # steps before the switch
N_SECOND = 3  # steps after it
PROBLEM = "mlp"

# the resume contract's own bars (relative to the parameter scale): the resumed and the uninterrupted run
# execute the same operations, so they differ only where the bridge's and JAX's layouts round differently
_RESUME_BAR = "the resume contract: float64 1e-12, float32 1e-5 relative (same operations on both runs)"
_TOL = {"float64": dict(rtol=1e-12, tolerance_reason=_RESUME_BAR),
        "float32": dict(rtol=1e-5, tolerance_reason=_RESUME_BAR)}
_SHORT = {"float64": "f64", "float32": "f32"}


def _sgd(ps, **kw):
    import torch_bridge

    return torch_bridge.SGD(ps, **kw)


def _lookahead(inner_name, inner_kw, k, alpha):
    def build(ps):
        import torch_bridge

        return torch_bridge.Lookahead(getattr(torch_bridge, inner_name)(ps, **inner_kw), k=k, alpha=alpha)

    return build


def _cls(name, **kw):
    def build(ps):
        import torch_bridge

        return getattr(torch_bridge, name)(ps, **kw)

    return build


_AUTOSGM = {
    "autosgm_hb": dict(aoptlr=False, beta_i=0.9, eta_i=1.0, debias=False, learning_rate=0.05),
    "autosgm_nag": dict(aoptlr=False, beta_i=0.9, gamma_i=0.9 / 1.9, eta_i=1.0, debias=False, learning_rate=0.05),
    "autosgm_adam": dict(aoptlr=True, num_lrc=0, beta_i=0.9, beta_a=0.999, eps=1e-8, learning_rate=1e-2),
    "autosgm_parcor": dict(aoptlr=True, num_lrc=1, beta_i=0.9, gamma_i=0.5528, learning_rate=1e-2),
}

# entry -> (JAX kwargs beyond the entry's own, torch factory, torch layout transposed?)
ROWS: dict[str, tuple[Mapping[str, Any], Callable, bool]] = {
    "sgd": (dict(learning_rate=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2),
            _cls("SGD", lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2), True),
    "adam": (dict(learning_rate=1e-2, weight_decay=0.1, amsgrad=True),
             _cls("Adam", lr=1e-2, weight_decay=0.1, amsgrad=True), True),
    "adamw": (dict(learning_rate=1e-2), _cls("AdamW", lr=1e-2), True),
    "adopt": (dict(learning_rate=1e-3, weight_decay=1e-2), _cls("ADOPT", lr=1e-3, weight_decay=1e-2), True),
    # t0 = 2: the averaging (ax, eta, mu) is live across the switch
    "asgd": (dict(learning_rate=0.05, t0=2, lambd=1e-2, weight_decay=1e-3),
             _cls("ASGD", lr=0.05, t0=2, lambd=1e-2, weight_decay=1e-3), True),
    "asgd_momentum": (dict(learning_rate=0.05, t0=2, lambd=1e-2),
                      _cls("ASGD", lr=0.05, t0=2, lambd=1e-2, momentum=0.9), True),
    # sync_period 2: slow weights synchronise in both phases (steps 2, 4, 6)
    "lookahead_sgd": (dict(learning_rate=0.05, sync_period=2, slow_step_size=0.5),
                      _lookahead("SGD", dict(lr=0.05, momentum=0.9), 2, 0.5), True),
    "lookahead_adam": (dict(learning_rate=1e-2, sync_period=2, slow_step_size=0.5),
                       _lookahead("Adam", dict(lr=1e-2), 2, 0.5), True),
    **{name: ({"learning_rate": kw["learning_rate"]}, _cls("AutoSGM", **kw), True) for name, kw in _AUTOSGM.items()},
    "elra_math": (dict(learning_rate=1e-3), _cls("ELRA", lr=1e-3), True),
    "elra_dnn": (dict(learning_rate=1e-4, classes=10, batch_size=64),
                 _cls("ELRA", lr=1e-4, classes=10, batch_size=64), True),
    "enhanced_sgd": (dict(learning_rate=0.05, momentum=0.9, lookahead_k=2, noise_scale=1e-3, seed=3),
                     _cls("EnhancedSGD", lr=0.05, momentum=0.9, lookahead_k=2, noise_scale=1e-3, seed=3), False),
}


def _torch_names(params: Mapping[str, Any], transposed: bool) -> list[str]:
    """The torch side's parameter order: the problem's order (as a torch module lists its layers), or the
    JAX leaf order (sorted names) for entries that index by leaf position."""
    return list(params) if transposed else sorted(params)


def mapping_for(params: Mapping[str, Any], transposed: bool):
    """torch parameter order -> JAX dict key, with ``(1, 0)`` for the 2-D weights stored ``(out, in)``."""
    from jaxopt_suite.checkpoint import ParamMapping

    return ParamMapping.from_pairs([(k, (1, 0) if transposed and np.ndim(params[k]) == 2 else None)
                                    for k in _torch_names(params, transposed)])


# (entry, kwargs, dtype) -> (transformation, its jitted step or None)
_JAX_STEPS: dict = {}


class _ResumeSide(Side):
    """Steps in one framework, converts the optimizer state after ``switch`` steps, continues in the other."""

    def __init__(self, label, entry_name, kwargs, factory, transposed, params, dtype, *, direction, switch,
                 keep_state=True):
        from jaxopt_suite import registry

        self.label = label
        self._entry = registry.get(entry_name)
        self._kwargs = dict(kwargs)
        self._factory = factory
        self._transposed = transposed
        self._dtype = dtype
        self._direction = direction
        self._switch = switch
        self._keep_state = keep_state
        self.round_trip = None  # differences found by the conversion round trip (None: not converted yet)
        self._steps = 0
        self._names = list(params)
        self._mapping = mapping_for(params, transposed)
        self.framework = "torch" if direction == "torch2jax" else "jax"
        if self.framework == "torch":
            self._start_torch(P.as_torch(params, dtype), None)
        else:
            self._jax = self._jax_side(params)

    def _key(self):
        return (self._entry.name, repr(sorted(self._kwargs.items())), self._dtype)

    def _tx(self):
        if self._key() not in _JAX_STEPS:
            _JAX_STEPS[self._key()] = (self._entry.build(**self._kwargs), None)
        return _JAX_STEPS[self._key()][0]

    def _jax_side(self, params):
        """A JAX side on ``params`` whose jitted step is shared by every resume side of this entry, kwargs
        and dtype (both directions and the known-wrong variant): one compile instead of three."""
        tx = self._tx()
        side = _JaxSide(self.label, tx, params, self._dtype, value_kw=self._entry.requires_value, use_mask=True)
        step = _JAX_STEPS[self._key()][1]
        if step is None:
            _JAX_STEPS[self._key()] = (tx, side._step)
        else:
            side._step = step
        return side

    # ---- torch phase ----------------------------------------------------------------------------------
    def _to_torch_layout(self, name, t):
        return t.T.contiguous() if self._transposed and t.dim() == 2 else t

    def _start_torch(self, params_problem_layout, state_dict):
        order = _torch_names(params_problem_layout, self._transposed)
        self._tparams = {k: self._to_torch_layout(k, params_problem_layout[k].detach().clone()).requires_grad_(True)
                         for k in order}
        self._opt = self._factory(list(self._tparams.values()))
        if state_dict is not None:
            self._opt.load_state_dict(state_dict)

    def _torch_problem_params(self):
        return {k: self._to_torch_layout(k, self._tparams[k].detach()).clone() for k in self._names}

    # ---- the Side interface ---------------------------------------------------------------------------
    def params(self):
        return self._torch_problem_params() if self.framework == "torch" else self._jax.params()

    def step(self, grads, value=None):
        if self.framework == "torch":
            for k, p in self._tparams.items():
                p.grad = self._to_torch_layout(k, grads[k].detach().clone())
            if self._entry.requires_value:
                self._opt.step(value=value)
            else:
                self._opt.step()
        else:
            self._jax.step(grads, value=value)
        self._steps += 1
        # convert right after the last step of the first phase: the runner computes the next gradient in
        # the framework this side reports
        if self._steps == self._switch:
            self._convert()

    def _convert(self):
        import jax.numpy as jnp

        from torch_bridge import checkpoint

        if self.framework == "torch":
            params = {k: jnp.asarray(v.numpy()) for k, v in self._torch_problem_params().items()}
            tx = self._tx()
            if self._keep_state:
                before = self._opt.state_dict()["state"]
                tx, state = checkpoint.to_optax(self._opt, params, mapping=self._mapping, tx=tx)
                # and back into a fresh optimizer: the state dict it gets must be the one converted
                import torch

                fresh = self._factory([self._to_torch_layout(k, torch.from_numpy(np.array(params[k])))
                                       .requires_grad_(True) for k in _torch_names(params, self._transposed)])
                back = checkpoint.to_torch(state, params, fresh, mapping=self._mapping)["state"]
                self.round_trip = _differences(before, back, self._rtol())
            else:
                state = tx.init(params)
            self._jax = self._jax_side(P.to_numpy(params))
            self._jax._state = state
            self.framework = "jax"
        else:
            import torch

            params = self._jax.params()
            state = self._jax.state
            problem = {k: torch.from_numpy(np.array(params[k])) for k in self._names}
            self._start_torch(problem, None)
            if self._keep_state:
                sd = checkpoint.to_torch(state, params, self._opt, mapping=self._mapping)
                self._opt.load_state_dict(sd)
                # and back to JAX: the state must be the one converted
                _, back = checkpoint.to_optax(self._opt, params, mapping=self._mapping, tx=self._tx())
                presence = tuple(getattr(self._opt, "presence_fields", ()))
                self.round_trip = _differences(_leaves(state, params, presence), _leaves(back, params, presence),
                                               self._rtol())
            self.framework = "torch"

    def _rtol(self) -> float:
        # AutoSGM's γ_i = 0 filter state crosses as S_t/β_i and back (one rounding each way)
        return 4 * float(np.finfo(self._dtype).eps) if self._entry.name.startswith("autosgm") else 0.0

    def observe(self):
        return P.to_numpy(self.params())

    @property
    def state(self):
        return self._opt if self.framework == "torch" else self._jax.state


def _leaves(state, params, presence=()) -> dict:
    """``{path: numpy array}`` of a JAX state over ``params`` (PRNG keys as their key data). Fields named in
    ``presence`` (the bridge's ``presence_fields``: per-parameter counters that torch's format keeps only as
    "stepped or not", e.g. SGD's) are compared as ``count > 0``, which is all the update reads of them."""
    import jax

    from jaxopt_suite.checkpoint import field_matches, walk_state

    out = {}
    for path, sub, _ in walk_state(state, jax.tree.structure(params)):
        for sub_path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
            if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            leaf = np.asarray(leaf)
            if any(field_matches(path, f) for f in presence):
                leaf = leaf > 0
            out["/".join(path) + jax.tree_util.keystr(sub_path)] = leaf
    return out


def _differences(a, b, rtol: float, where: str = "state") -> list[str]:
    """Where two state trees (torch state dicts or :func:`_leaves` dicts) differ: keys, dtypes, shapes,
    values (bitwise, NaN = NaN; floats within ``rtol`` when given)."""
    import torch

    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, a)) if isinstance(a, dict) else a} vs "
                    f"{sorted(map(str, b)) if isinstance(b, dict) else b}"]
        return [d for k in a for d in _differences(a[k], b[k], rtol, f"{where}/{k}")]
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dtype != b.dtype:
            return [f"{where}: {getattr(a, 'dtype', type(a))} vs {getattr(b, 'dtype', type(b))}"]
        a, b = a.detach().cpu().numpy(), b.detach().cpu().numpy()
    if not isinstance(a, np.ndarray):
        return [] if a == b else [f"{where}: {a!r} vs {b!r}"]
    if a.dtype != b.dtype or a.shape != b.shape:
        return [f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"]
    if np.issubdtype(a.dtype, np.floating) and rtol:
        ok = np.isclose(a, b, rtol=rtol, atol=0.0, equal_nan=True).all()
    else:
        ok = np.array_equal(a, b, equal_nan=np.issubdtype(a.dtype, np.floating))
    return [] if ok else [f"{where}: values differ (max |Δ| {np.max(np.abs(a.astype(float) - b.astype(float)))})"]


def check_round_trip(result) -> None:
    """The row's own check: the converted state converts back to itself (to the other framework and back)."""
    problems = getattr(result.ref_side, "round_trip", None)
    assert problems is not None, "the resume side did not convert"
    assert not problems, "state round trip: " + "; ".join(problems[:3])


@dataclasses.dataclass(frozen=True)
class ResumeReference(Reference):
    entry: str = ""
    factory: Callable = None
    transposed: bool = True
    direction: str = "torch2jax"
    switch: int = N_FIRST
    keep_state: bool = True

    @property
    def framework(self) -> str:
        return "torch" if self.direction == "torch2jax" else "jax"

    def make(self, params, dtype):
        return _ResumeSide(self.name, self.entry, self.kwargs, self.factory, self.transposed, params, dtype,
                           direction=self.direction, switch=self.switch, keep_state=self.keep_state)


def _reference(entry, kwargs, factory, transposed, direction, keep_state=True):
    first, second = ("torch", "jax") if direction == "torch2jax" else ("jax", "torch")
    name = f"{first}[{N_FIRST}] -> {second}[{N_SECOND}]" + ("" if keep_state else " fresh state [wrong]")
    return ResumeReference(name=name, kwargs=MappingProxyType(dict(kwargs)), entry=entry, factory=factory,
                           transposed=transposed, direction=direction, keep_state=keep_state)


def cases():
    from jaxopt_suite import registry

    out = []
    for entry, (kwargs, factory, transposed) in ROWS.items():
        reg = registry.get(entry)
        kw = {**dict(reg.kwargs), **dict(kwargs)}
        for direction in ("torch2jax", "jax2torch"):
            for dtype in ("float64", "float32"):
                # one known-wrong variant per entry (float64, torch -> JAX) keeps the default run short
                wrong = _reference(entry, kw, factory, transposed, direction, keep_state=False) \
                    if dtype == "float64" and direction == "torch2jax" else None
                out.append(ParityCase(
                    name=f"resume_{entry}_{direction}_{PROBLEM}_{_SHORT[dtype]}", entry=entry, kwargs=kw,
                    reference=_reference(entry, kw, factory, transposed, direction), problem=PROBLEM,
                    dtype=dtype, steps=N_FIRST + N_SECOND, wrong=wrong, slow=dtype == "float32",
                    check=check_round_trip, **_TOL[dtype],
                    note=("torch layout (out, in)" if transposed else "JAX layout and leaf order")
                    + f", {N_FIRST} + {N_SECOND} steps vs {N_FIRST + N_SECOND} uninterrupted JAX steps"))
    return out


def covered_entries() -> set[str]:
    """Registry entries with resume rows (a test checks that this is all of them)."""
    return set(ROWS)
