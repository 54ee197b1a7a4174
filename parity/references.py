"""Everything a parity run steps, behind one interface.

A :class:`Reference` is a *description* (a label, keyword arguments, a builder) that is cheap to create and
imports nothing; ``make(params, dtype)`` turns it into a live :class:`Side` on the given initial params
(numpy float64, cast to ``dtype``). A side is stepped with gradients in its own framework's arrays:

* :class:`Side.params` — the current params in the side's framework (used to compute its gradient);
* :meth:`Side.step(grads, value=None)` — one optimizer step; a ``None`` gradient means "this parameter has
  no gradient" (torch: ``.grad = None``; suite JAX: ``grad_mask`` False);
* :meth:`Side.observe` — numpy copies of the params plus any extra quantities (``"ax:w1"``...) to compare.

Kinds of references:

* :func:`suite` — any ``jaxopt_suite.registry`` entry, driven as a jitted JAX step (our side);
* :func:`torch_optim` — a ``torch.optim`` class on the single-tensor path (``foreach=False``);
* :func:`optax_tx` / :func:`optax_lookahead` — an optax transformation (chains, ``optax.contrib.adopt``...);
* :func:`torch_adopt` — the official ADOPT package (``torch-adopt``);
* :func:`po` / :func:`po_lookahead` — pytorch_optimizer classes;
* :func:`bridge` — a ``torch_bridge`` class (our optimizers as ``torch.optim.Optimizer``), flat or simple path;
* :class:`TorchReference` / :class:`OptaxReference` for anything else (a builder callable).

This module and ``tests/`` are the only places where the external references are imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from . import problems as P

# --------------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------------


class Side:
    """A live optimizer on live params. Subclasses set ``framework`` ("jax" or "torch") and ``label``."""

    framework: str = ""
    label: str = ""

    def params(self) -> dict:
        raise NotImplementedError

    def step(self, grads: Mapping[str, Any], value: Optional[float] = None) -> None:
        raise NotImplementedError

    def observe(self) -> dict[str, np.ndarray]:
        """numpy copies of the params (keys = param names) and extras (keys ``"<what>:<param>"``)."""
        raise NotImplementedError

    @property
    def state(self) -> Any:
        """The optimizer state (a JAX pytree or the torch optimizer), for case-specific checks."""
        raise NotImplementedError


def _describe(kwargs: Mapping[str, Any]) -> str:
    def fmt(v):
        if callable(v):
            return getattr(v, "__name__", "fn")
        if isinstance(v, float):
            return f"{v:g}"
        return repr(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in kwargs.items())


@dataclasses.dataclass(frozen=True)
class Reference:
    """A description of something to step: ``name`` labels it in tables; ``make`` builds a :class:`Side`."""

    name: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @property
    def framework(self) -> str:
        raise NotImplementedError

    def make(self, params: Mapping[str, np.ndarray], dtype: str) -> Side:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}({_describe(self.kwargs)})"


# --------------------------------------------------------------------------------------------------
# JAX sides: the suite's registry entries and optax transformations
# --------------------------------------------------------------------------------------------------


def _mask_and_zeros(grads: Mapping[str, Any], params: Mapping[str, Any]):
    """Replace None gradients by zeros and build the matching ``grad_mask`` (None if all present)."""
    import jax.numpy as jnp

    if all(g is not None for g in grads.values()):
        return dict(grads), None
    filled = {k: (jnp.zeros_like(params[k]) if g is None else g) for k, g in grads.items()}
    mask = {k: jnp.asarray(g is not None) for k, g in grads.items()}
    return filled, mask


class _JaxSide(Side):
    framework = "jax"

    def __init__(self, label, tx, params, dtype, *, value_kw: bool, use_mask: bool, extras=None,
                 to_params=None, from_params=None, compiled=None):
        import jax
        import optax

        self.label = label
        self._dtype = dtype
        self._extras = extras
        self._to_params = to_params or (lambda p: p)  # optimizer-side params -> model params
        self._opt_params = (from_params or (lambda p: p))(P.as_jax(params, dtype))
        self._state = tx.init(self._opt_params)
        self._use_mask = use_mask

        def step(opt_params, state, grads, value, grad_mask):
            extra = {}
            if value_kw:
                extra["value"] = value
            if grad_mask is not None:
                extra["grad_mask"] = grad_mask
            updates, state = tx.update(grads, state, opt_params, **extra)
            return optax.apply_updates(opt_params, updates), state

        # ``compiled``: a jitted step of the same transformation from an earlier side (jit's cache then
        # serves this side without compiling again)
        self._step = compiled if compiled is not None else jax.jit(step)

    def params(self):
        return self._to_params(self._opt_params)

    def step(self, grads, value=None):
        import jax.numpy as jnp

        grads, mask = _mask_and_zeros(grads, self.params())
        if mask is not None and not self._use_mask:
            raise ValueError(f"{self.label} cannot skip a parameter (None gradient)")
        value = jnp.asarray(0.0 if value is None else value, self._dtype)
        self._opt_params, self._state = self._step(self._opt_params, self._state, grads, value, mask)

    def perturb(self, rel: float, signs: Mapping[str, np.ndarray]) -> None:
        """Multiply every param element by ``1 + rel * sign`` (the error model's injected rounding error,
        see :func:`parity.runner.rounding_response`).

        Only for sides whose optimizer params are the model params (suite and plain optax sides)."""
        import jax.numpy as jnp

        if self._to_params(self._opt_params) is not self._opt_params:
            raise TypeError(f"{self.label}: params cannot be perturbed through a params mapping")
        self._opt_params = {k: p * jnp.asarray(1 + rel * signs[k], p.dtype) for k, p in self._opt_params.items()}

    def observe(self):
        out = P.to_numpy(self.params())
        if self._extras is not None:
            for what, tree in self._extras(self._state, self._opt_params).items():
                for k, v in tree.items():
                    out[f"{what}:{k}"] = np.array(v)
        return out

    @property
    def state(self):
        return self._state


# (id(reference), dtype) -> (the reference, kept alive so that its id stays unique; its transformation; the
# jitted step of the last side made from it). The transformation is pure, so sides built from one reference
# share it, and its jitted step compiles once for them all (parity runs drive our side several times).
_SUITE_STEPS: dict = {}


@dataclasses.dataclass(frozen=True)
class SuiteReference(Reference):
    """A ``jaxopt_suite.registry`` entry (its kwargs updated by ``kwargs``), as a jitted JAX step.

    ``extras(state, params) -> {what: {param_name: array}}`` exposes state quantities to compare (e.g.
    ASGD's averaged params). ``value`` is passed when the entry requires it; ``None`` gradients become
    ``grad_mask`` False.
    """

    entry: str = ""
    extras: Optional[Callable[[Any, Any], Mapping[str, Mapping[str, Any]]]] = None

    @property
    def framework(self) -> str:
        return "jax"

    def make(self, params, dtype):
        from jaxopt_suite import registry

        entry = registry.get(self.entry)
        key = (id(self), dtype)
        if key not in _SUITE_STEPS:
            kwargs = self.kwargs() if callable(self.kwargs) else dict(self.kwargs)
            _SUITE_STEPS[key] = (self, entry.build(**kwargs), None)
        _, tx, compiled = _SUITE_STEPS[key]
        side = _JaxSide(self.name, tx, params, dtype, value_kw=entry.requires_value, use_mask=True,
                        extras=self.extras, compiled=compiled)
        _SUITE_STEPS[key] = (self, tx, side._step)
        return side

    def describe(self) -> str:
        kwargs = "(lazy kwargs)" if callable(self.kwargs) else _describe(self.kwargs)
        return f"jaxopt_suite:{self.entry}({kwargs})"


def suite(entry: str, kwargs: Mapping[str, Any] | Callable[[], Mapping[str, Any]] = MappingProxyType({}),
          *, extras=None, name: Optional[str] = None) -> SuiteReference:
    """Our side: registry entry ``entry`` built with ``kwargs`` (a mapping, or a callable returning one
    so that cases can name transformations without importing them at definition time)."""
    return SuiteReference(name=name or f"jax:{entry}", kwargs=kwargs, entry=entry, extras=extras)


@dataclasses.dataclass(frozen=True)
class OptaxReference(Reference):
    """An optax transformation from ``build()`` (called inside the run's x64 context)."""

    build: Callable[[], Any] = None
    requires_value: bool = False
    extras: Optional[Callable[[Any, Any], Mapping[str, Mapping[str, Any]]]] = None

    @property
    def framework(self) -> str:
        return "jax"

    def make(self, params, dtype):
        return _JaxSide(self.name, self.build(), params, dtype, value_kw=self.requires_value, use_mask=False,
                        extras=self.extras)


def optax_tx(name: str, build: Callable[[], Any], *, requires_value: bool = False, **described) -> OptaxReference:
    """An optax transformation; ``described`` kwargs are only shown in tables (``build`` holds the truth)."""
    return OptaxReference(name=name, kwargs=MappingProxyType(described), build=build,
                          requires_value=requires_value)


@dataclasses.dataclass(frozen=True)
class OptaxLookaheadReference(OptaxReference):
    """``optax.lookahead``, whose params are ``LookaheadParams(fast, slow)``; the fast weights are compared
    as the params and the slow weights as the extra ``"slow"``."""

    def make(self, params, dtype):
        import optax

        def from_params(p):
            return optax.LookaheadParams.init_synced(p)

        return _JaxSide(self.name, self.build(), params, dtype, value_kw=self.requires_value, use_mask=False,
                        to_params=lambda lp: lp.fast, from_params=from_params,
                        extras=lambda state, lp: {"slow": lp.slow})


def optax_lookahead(name: str, build: Callable[[], Any], **described) -> OptaxLookaheadReference:
    """``optax.lookahead(...)`` built by ``build()``."""
    return OptaxLookaheadReference(name=name, kwargs=MappingProxyType(described), build=build)


# --------------------------------------------------------------------------------------------------
# torch sides
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_default_dtype(dtype: Optional[str]):
    import torch

    if dtype is None:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class _TorchSide(Side):
    framework = "torch"

    def __init__(self, label, build, params, dtype, *, state_keys=(), default_dtype=None, pass_value=False):
        import torch

        self.label = label
        self._default_dtype = default_dtype
        self._params = {k: v.requires_grad_(True) for k, v in P.as_torch(params, dtype).items()}
        with _torch_default_dtype(default_dtype):
            self._opt = build(list(self._params.values()))
        self._state_keys = tuple(state_keys)
        self._pass_value = pass_value
        self._torch = torch

    def params(self):
        return self._params

    def step(self, grads, value=None):
        for k, p in self._params.items():
            g = grads[k]
            p.grad = None if g is None else g.detach().clone()
        with _torch_default_dtype(self._default_dtype):
            if self._pass_value:  # loss-driven optimizers of the bridge take ``step(value=loss)``
                self._opt.step(value=value)
            else:
                self._opt.step()

    def observe(self):
        out = P.to_numpy(self._params)
        for key in self._state_keys:
            for k, p in self._params.items():
                st = self._opt.state.get(p, {})
                if key in st:
                    out[f"{key}:{k}"] = st[key].detach().cpu().numpy().copy()
        return out

    @property
    def state(self):
        return self._opt


@dataclasses.dataclass(frozen=True)
class TorchReference(Reference):
    """A torch optimizer from ``build(list_of_params)``; ``state_keys`` are compared as extras; the
    optimizer is created and stepped under torch default dtype ``default_dtype`` when given."""

    build: Callable[[list], Any] = None
    state_keys: tuple[str, ...] = ()
    default_dtype: Optional[str] = None
    pass_value: bool = False

    @property
    def framework(self) -> str:
        return "torch"

    def make(self, params, dtype):
        return _TorchSide(self.name, self.build, params, dtype, state_keys=self.state_keys,
                          default_dtype=self.default_dtype, pass_value=self.pass_value)


def _with_single_tensor_path(cls, kwargs: dict) -> dict:
    """Add ``foreach=False`` when the class accepts it (the single-tensor path is the pinned reference)."""
    if "foreach" in inspect.signature(cls.__init__).parameters and "foreach" not in kwargs:
        kwargs = {**kwargs, "foreach": False}
    return kwargs


def torch_optim(cls_name: str, *, state_keys: Sequence[str] = (), default_dtype: Optional[str] = None,
                **kwargs) -> TorchReference:
    """``torch.optim.<cls_name>(params, **kwargs)`` with ``foreach=False``."""

    def build(params):
        import torch

        cls = getattr(torch.optim, cls_name)
        return cls(params, **_with_single_tensor_path(cls, kwargs))

    name = f"torch.optim.{cls_name}" + (f"[default {default_dtype}]" if default_dtype else "")
    return TorchReference(name=name, kwargs=MappingProxyType(kwargs), build=build,
                          state_keys=tuple(state_keys), default_dtype=default_dtype)


def torch_adopt(**kwargs) -> TorchReference:
    """The official ADOPT (``torch-adopt`` 0.1.0, ``adopt.ADOPT``), single-tensor path."""

    def build(params):
        from adopt import ADOPT

        return ADOPT(params, **_with_single_tensor_path(ADOPT, kwargs))

    return TorchReference(name="torch-adopt.ADOPT", kwargs=MappingProxyType(kwargs), build=build)


def po(cls_name: str, *, state_keys: Sequence[str] = (), **kwargs) -> TorchReference:
    """``pytorch_optimizer.<cls_name>(params, **kwargs)``."""

    def build(params):
        import pytorch_optimizer

        cls = getattr(pytorch_optimizer, cls_name)
        return cls(params, **_with_single_tensor_path(cls, kwargs))

    return TorchReference(name=f"PO.{cls_name}", kwargs=MappingProxyType(kwargs), build=build,
                          state_keys=tuple(state_keys))


def po_lookahead(inner: TorchReference, **kwargs) -> TorchReference:
    """``pytorch_optimizer.Lookahead(inner_optimizer, **kwargs)`` around another torch reference."""

    def build(params):
        import pytorch_optimizer

        return pytorch_optimizer.Lookahead(inner.build(params), **kwargs)

    return TorchReference(name=f"PO.Lookahead[{inner.name}]",
                          kwargs=MappingProxyType({**kwargs, **dict(inner.kwargs)}), build=build)



def bridge(cls_name: str, *, flat: bool = True, pass_value: bool = False, state_keys: Sequence[str] = (),
           default_dtype: Optional[str] = None, **kwargs) -> TorchReference:
    """``torch_bridge.<cls_name>(params, flat=flat, **kwargs)``: our optimizer behind torch's signature.

    ``flat=True`` is the bridge's packed-buffer path, ``flat=False`` its per-tensor (simple) path. float64
    params need x64, which the runner enables for float64 cases. ``default_dtype`` runs it under that torch
    default dtype (as torch's ASGD, the bridge picks its scalar dtype from it).
    """

    def build(params):
        import torch_bridge

        return getattr(torch_bridge, cls_name)(params, flat=flat, **kwargs)

    path = "flat" if flat else "simple"
    return TorchReference(name=f"torch_bridge.{cls_name}[{path}]", kwargs=MappingProxyType(kwargs), build=build,
                          state_keys=tuple(state_keys), pass_value=pass_value, default_dtype=default_dtype)
