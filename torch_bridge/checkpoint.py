"""Train in one framework, resume in the other: optimizer state between PyTorch and JAX/optax.

Two functions, one per direction; the parameter mapping (torch parameter order and layout ⇄ Flax paths) and
the layout rules are :mod:`jaxopt_suite.checkpoint`'s:

* :func:`to_optax` — a ``torch_bridge`` optimizer, its ``state_dict()`` or its ``torch.save`` file, or a
  ``torch.optim.{SGD, Adam, AdamW, ASGD}`` state dict, + the Flax params → ``(tx, opt_state)`` ready for
  ``tx.update``. ``tx`` is the suite's transformation with the checkpoint's hyperparameters; pass your own
  ``tx`` (a suite transformation, or ``optax.sgd``/``optax.adam``/``optax.adamw``) to fill its state instead.
* :func:`to_torch` — an opt_state (of a suite transformation, or of ``optax.sgd/adam/adamw``) + the Flax
  params → a state dict that the target optimizer's ``load_state_dict`` accepts (a bridge class, or
  ``torch.optim.{SGD, Adam, AdamW, ASGD}``: the bridge's state dicts are torch's format).

How the state is mapped: the bridge already converts its JAX state to torch's per-parameter ``state_dict``
entries and back (``JaxOptimizer._checkpoint_export`` / ``_checkpoint_import`` use the same code as
``state_dict``/``load_state_dict``); these functions only move that per-parameter (list-layout) JAX state to
the Flax pytree and layout (:func:`jaxopt_suite.checkpoint.tree_state_from_list`) and back. So every
registry entry's state, global leaves included (step counts, PRNG keys, ELRA's and EnhancedSGD's
controller scalars, Lookahead's counter), carries over bit for bit.

Counts: torch's ``step`` (a float32 tensor) and optax's ``count`` (int32) both hold the number of updates
already applied; both bias-correct the next update with ``t = step + 1``, so ``count = step`` exactly.

Errors (``ValueError``) name the parameter for a shape or dtype mismatch, and the hyperparameter or the
state leaf for an optimizer or hyperparameter mismatch. Dtypes are never cast silently (torch's own
``load_state_dict`` would).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from jaxopt_suite import checkpoint as C
from jaxopt_suite.checkpoint import ParamMapping, default_mapping

from . import dlpack

__all__ = ["ParamMapping", "default_mapping", "flax_params", "load", "load_into_torch", "to_optax", "to_torch"]

_TORCH_OPTIM = ("SGD", "Adam", "AdamW", "ASGD")


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def load(source) -> dict:
    """A state dict from a dict, a ``torch.save`` file (loaded with ``weights_only=True``) or an optimizer."""
    if isinstance(source, torch.optim.Optimizer):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        return torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(source, Mapping) and "state" in source and "param_groups" in source:
        return source
    raise TypeError(f"expected a state dict, a torch.save path or a torch optimizer, got {type(source).__name__}")


def _is_bridge(obj) -> bool:
    return hasattr(obj, "_checkpoint_export")


def _bridge_factory(optimizer) -> Callable[[list], Any]:
    """A callable ``params -> bridge optimizer`` for a bridge class/factory or a ``torch.optim`` class."""
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer) and not _is_bridge(optimizer):
        if optimizer.__module__.startswith("torch.optim") and optimizer.__name__ in _TORCH_OPTIM:
            import torch_bridge

            return getattr(torch_bridge, optimizer.__name__)
        raise ValueError(f"optimizer mismatch: {optimizer.__name__} has no torch_bridge counterpart "
                         f"(supported torch.optim classes: {', '.join(_TORCH_OPTIM)})")
    if callable(optimizer):
        return optimizer
    raise TypeError(f"optimizer: expected a torch_bridge class or factory, got {type(optimizer).__name__}")


def _mapping(params, mapping, torch_names):
    if mapping is None:
        return default_mapping(params, torch_names)
    if isinstance(mapping, ParamMapping):
        return mapping
    return ParamMapping.from_pairs(mapping)


def _torch_dtype(jax_dtype) -> torch.dtype:
    return dlpack.to_torch(jnp.zeros((), jax_dtype)).dtype


def _np_dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _placeholders(params, mapping: ParamMapping) -> list[torch.Tensor]:
    """Torch tensors with the Flax params' values in torch order and layout (the bridge's fresh state, e.g.
    ELRA's ``x_lastgood`` or Lookahead's slow weights, starts from the parameter values)."""
    out = []
    for i, leaf in enumerate(mapping.torch_params(params)):
        t = torch.from_numpy(np.array(leaf)).to(_torch_dtype(leaf.dtype))
        out.append(t.requires_grad_(True))
    return out


def _check_state_dict(sd: Mapping, mapping: ParamMapping, torch_params: Sequence[torch.Tensor]):
    """Per-parameter state tensors against the torch-layout params: count, shape and dtype, by name."""
    n_saved = sum(len(g["params"]) for g in sd["param_groups"])
    if n_saved != len(torch_params):
        raise ValueError(f"the checkpoint has {n_saved} parameters, the Flax params (through the mapping) "
                         f"{len(torch_params)}")
    ids = [pid for g in sd["param_groups"] for pid in g["params"]]
    index = {pid: i for i, pid in enumerate(ids)}
    for pid, st in sd["state"].items():
        if pid not in index or not isinstance(st, Mapping):
            continue  # global entries (EnhancedSGD's "controller", ELRA's "elra")
        i = index[pid]
        p = torch_params[i]
        for key, value in st.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"shape mismatch for parameter {mapping.paths[i]!r} (torch parameter {i}): "
                                 f"state {key!r} has shape {tuple(value.shape)}, the parameter maps to "
                                 f"{tuple(p.shape)}")
            if value.is_floating_point() and value.dtype != p.dtype:
                raise ValueError(f"dtype mismatch for parameter {mapping.paths[i]!r} (torch parameter {i}): "
                                 f"state {key!r} is {_np_dtype_name(value)}, the Flax parameter "
                                 f"{_np_dtype_name(p)}")


def _per_param_entries(sd: Mapping):
    ids = {pid for g in sd["param_groups"] for pid in g["params"]}
    return [st for pid, st in sd["state"].items() if pid in ids and isinstance(st, Mapping)]


def _check_format(sd: Mapping, opt) -> None:
    """``ValueError`` when ``sd`` was evidently written by another optimizer than ``opt``'s class: its param
    groups lack a key ``opt``'s groups have, or a parameter's state has a key ``opt`` does not keep.

    torch's Adam and AdamW (and the bridge's) share one format but for ``decoupled_weight_decay``.
    """
    name = type(opt).__name__
    have = set().union(*(set(g) for g in sd["param_groups"])) - {"params"}
    want = set(opt.param_groups[0]) - {"params"}
    missing, foreign = sorted(want - have), sorted(have - want)
    # keys only missing are filled with defaults by load_state_dict (a torch.optim.ASGD checkpoint into the
    # bridge's ASGD, which adds ``momentum``); keys missing *and* foreign ones mean another optimizer
    if missing and foreign:
        raise ValueError(f"optimizer mismatch: the checkpoint's param groups have no {missing}, which {name}'s "
                         f"have, and have {foreign}, which {name}'s have not (saved by another optimizer)")
    # torch's Adam and AdamW differ in their groups only by this flag (AdamW fixes it to True)
    flag = "decoupled_weight_decay"
    if flag in want and any(flag in g and bool(g[flag]) != bool(opt.param_groups[0][flag])
                            for g in sd["param_groups"]):
        raise ValueError(f"optimizer mismatch: the checkpoint has {flag}={not opt.param_groups[0][flag]}, "
                         f"{name} {flag}={bool(opt.param_groups[0][flag])} (Adam vs AdamW)")
    known = set(getattr(opt, "state_keys", {}) or {})
    if known:
        for st in _per_param_entries(sd):
            unknown = sorted(set(st) - known)
            if unknown:
                raise ValueError(f"optimizer mismatch: the checkpoint's parameter state has keys {unknown}, "
                                 f"which {name} does not keep (it keeps {sorted(known)})")


_OPTAX_KEYS = {"adam": {"step", "exp_avg", "exp_avg_sq"}, "sgd": {"momentum_buffer"}}


# --------------------------------------------------------------------------------------------------
# optax's own states (optax.sgd / adam / adamw): a direct per-field map
# --------------------------------------------------------------------------------------------------


def _optax_kind(state) -> Optional[str]:
    """``"adam"`` / ``"sgd"`` when ``state`` holds optax's ScaleByAdamState / TraceState, else None."""
    found = set()

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            found.add("adam")
        elif isinstance(node, optax.TraceState):
            found.add("sgd")
        elif isinstance(node, (tuple, list)):
            for c in node:
                visit(c)
        elif isinstance(node, dict):
            for c in node.values():
                visit(c)

    visit(state)
    if len(found) > 1:
        raise ValueError(f"unsupported optax state: it holds both {sorted(found)} states")
    return found.pop() if found else None


def _optax_map(node, fn):
    if isinstance(node, (optax.ScaleByAdamState, optax.TraceState)):
        return fn(node)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_optax_map(c, fn) for c in node))
    if isinstance(node, (tuple, list)):
        return type(node)(_optax_map(c, fn) for c in node)
    return node


def _group_value(group: Mapping, name: str):
    """A torch group's value under the suite/optax hyperparameter name."""
    if name == "learning_rate":
        return group["lr"]
    if name in ("b1", "b2"):
        return group["betas"][0 if name == "b1" else 1]
    return group[name]


def _check_group(group: Mapping, hyperparams: Optional[Mapping[str, Any]], what: str):
    if not hyperparams:
        return
    actual = {}
    for name in hyperparams:
        try:
            actual[name] = _group_value(group, name)
        except KeyError:
            pass
    C.kwargs_mismatch(hyperparams, actual, what)


def _optax_from_torch(tx, sd, params, mapping, kind):
    template = tx.init(params)
    flat_p, tree_def = jax.tree.flatten(params)
    order = mapping.order(params)
    ids = [pid for g in sd["param_groups"] for pid in g["params"]]
    per_param = [sd["state"].get(pid, {}) for pid in ids]

    def tree_of(key):
        placed = [None] * len(order)
        for i, j in enumerate(order):
            st = per_param[i]
            if key in st:
                value = jnp.asarray(st[key].detach().cpu().numpy())
                placed[j] = mapping.to_flax(i, value).astype(flat_p[j].dtype)
            else:
                placed[j] = jnp.zeros_like(flat_p[j])
        return tree_def.unflatten(placed)

    allowed = _OPTAX_KEYS[kind]
    for i, st in enumerate(per_param):
        extra = sorted(set(st) - allowed)
        if extra and not (kind == "adam" and extra == ["max_exp_avg_sq"]):
            raise ValueError(f"optimizer mismatch: parameter {mapping.paths[i]!r} has state {sorted(st)}; "
                             f"optax's {kind} state holds {sorted(allowed)} (torch "
                             f"{'Adam/AdamW' if kind == 'adam' else 'SGD with momentum'})")
    if kind == "adam":
        if any("max_exp_avg_sq" in st for st in per_param):
            raise ValueError("optimizer mismatch: the checkpoint has amsgrad state (max_exp_avg_sq); "
                             "optax.adam has none (use jaxopt_suite.adam(amsgrad=True))")
        steps = {float(st["step"]) for st in per_param if "step" in st}
        steps |= {0.0} if any("step" not in st for st in per_param) else set()
        if len(steps) > 1:
            raise ValueError(f"optax.adam keeps one count for all parameters; the checkpoint's per-parameter "
                             f"steps differ ({sorted(steps)}): convert to jaxopt_suite.adam/adamw instead")
        count = int(steps.pop()) if steps else 0

        def fill(s):
            return s._replace(count=jnp.asarray(count, s.count.dtype), mu=tree_of("exp_avg"),
                              nu=tree_of("exp_avg_sq"))
    else:
        def fill(s):
            return s._replace(trace=tree_of("momentum_buffer"))

    state = _optax_map(template, fill)
    C.check_like(state, template)
    return state


def _torch_from_optax(state, params, mapping, target, kind):
    flat_p, tree_def = jax.tree.flatten(params)
    order = mapping.order(params)
    out_state = {}

    def leaf_of(tree, i, j):
        return torch.from_numpy(np.array(mapping.to_torch(i, tree_def.flatten_up_to(tree)[j]))).clone()

    found = []
    _optax_map(state, lambda s: found.append(s) or s)
    (s,) = found
    for i, j in enumerate(order):
        if kind == "adam":
            if int(s.count) == 0:
                continue  # no update taken: torch has no state either
            out_state[i] = {"step": torch.tensor(float(s.count), dtype=torch.float32),
                            "exp_avg": leaf_of(s.mu, i, j), "exp_avg_sq": leaf_of(s.nu, i, j)}
        else:
            buf = leaf_of(s.trace, i, j)
            if bool(torch.any(buf != 0)):
                # an all-zero trace is a fresh one: torch then starts the buffer from the gradient, which
                # is optax's g + momentum * 0
                out_state[i] = {"momentum_buffer": buf}
    groups = copy.deepcopy(target.state_dict()["param_groups"])
    return {"state": out_state, "param_groups": groups}


# --------------------------------------------------------------------------------------------------
# the parameters themselves (the same mapping as the state)
# --------------------------------------------------------------------------------------------------


def _torch_param_list(source) -> tuple[list[torch.Tensor], Optional[list[str]]]:
    if isinstance(source, torch.nn.Module):
        named = list(source.named_parameters())
        return [p for _, p in named], [n for n, _ in named]
    return list(source), None


def flax_params(source, like, *, mapping=None):
    """The torch parameters' values as a Flax pytree shaped like ``like`` (e.g. ``nnx.state(model,
    nnx.Param)``): parameter ``i`` of ``source`` (an ``nn.Module`` or a sequence of tensors, torch order)
    goes to leaf ``mapping.paths[i]``, permuted by ``mapping.axes[i]``. Shapes and dtypes must match (the
    error names the parameter). Load the result into an NNX model with ``nnx.update(model, params)``."""
    tparams, names = _torch_param_list(source)
    mapping = _mapping(like, mapping, names)
    C.check_params(like, mapping, [tuple(p.shape) for p in tparams], [_np_dtype_name(p) for p in tparams], names)
    leaves, tree_def = jax.tree.flatten(like)
    out = list(leaves)
    for i, j in enumerate(mapping.order(like)):
        out[j] = mapping.to_flax(i, jnp.asarray(tparams[i].detach().cpu().numpy()))
    return tree_def.unflatten(out)


def load_into_torch(params, target, *, mapping=None) -> None:
    """Copy the Flax ``params`` into the torch parameters of ``target`` (an ``nn.Module`` or a sequence of
    tensors, torch order), in place: the inverse of :func:`flax_params`."""
    tparams, names = _torch_param_list(target)
    mapping = _mapping(params, mapping, names)
    C.check_params(params, mapping, [tuple(p.shape) for p in tparams], [_np_dtype_name(p) for p in tparams],
                   names)
    for p, value in zip(tparams, mapping.torch_params(params)):
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.array(value)))


# --------------------------------------------------------------------------------------------------
# the two directions
# --------------------------------------------------------------------------------------------------


def to_optax(source, params, optimizer=None, *, mapping=None, tx=None, hyperparams=None,
             torch_names: Optional[Sequence[str]] = None):
    """``(tx, opt_state)`` over the Flax ``params`` from a torch-side optimizer state.

    Args:
      source: a ``torch_bridge`` optimizer (its live state), its ``state_dict()``, a ``torch.save`` file of
        one, or a ``torch.optim.{SGD, Adam, AdamW, ASGD}`` optimizer / state dict.
      params: the Flax parameters (any pytree: a dict, ``nnx.state(model, nnx.Param)``...), with the values
        the torch parameters have (fresh state such as ELRA's ``x_lastgood`` starts from them).
      optimizer: what produced ``source`` when it is a dict or a file: a ``torch_bridge`` class or a factory
        ``params -> optimizer`` carrying constructor options that are not in the state dict
        (``functools.partial(torch_bridge.ELRA, classes=10)``, ``lambda ps: torch_bridge.Lookahead(
        torch_bridge.SGD(ps, lr=0.1, momentum=0.9))``), or a ``torch.optim`` class. The param groups'
        hyperparameters come from the state dict.
      mapping: a :class:`ParamMapping` or ``[(flax_path, axes), ...]`` in torch parameter order; default
        :func:`default_mapping` (standard layers; checked against ``torch_names`` when given).
      tx: fill this transformation's state instead of the suite's (a suite transformation, checked leaf by
        leaf against the checkpoint's; or ``optax.sgd``/``adam``/``adamw`` from a torch SGD/Adam/AdamW state).
      hyperparams: suite/optax-named hyperparameters you intend to use (``{"learning_rate": 1e-3,
        "weight_decay": 0.01}``): each must equal the checkpoint's, else ``ValueError`` naming it.

    Returns:
      ``(tx, opt_state)``; ``tx`` is the given one or the suite's transformation with the checkpoint's
      hyperparameters, ``opt_state`` the state to continue from with ``tx.update``.
    """
    mapping = _mapping(params, mapping, torch_names)
    if tx is not None and _optax_kind(jax.eval_shape(tx.init, params)) is not None:
        kind = _optax_kind(jax.eval_shape(tx.init, params))
        sd = load(source)
        placeholders = _placeholders(params, mapping)
        _check_state_dict(sd, mapping, placeholders)
        if len(sd["param_groups"]) != 1:
            raise ValueError(f"the checkpoint has {len(sd['param_groups'])} param groups; optax's {kind} state "
                             "covers one")
        _check_group(sd["param_groups"][0], hyperparams, "the checkpoint")
        return tx, _optax_from_torch(tx, sd, params, mapping, kind)

    if source is not None and _is_bridge(source) and optimizer is None:
        opt = source
        torch_params = None
    else:
        if optimizer is None:
            if isinstance(source, torch.optim.Optimizer):
                optimizer = type(source)
            else:
                raise ValueError("to_optax: name the optimizer that produced the state dict "
                                 "(e.g. optimizer=torch_bridge.AdamW)")
        sd = load(source)
        torch_params = _placeholders(params, mapping)
        _check_state_dict(sd, mapping, torch_params)
        opt = _bridge_factory(optimizer)(torch_params)
        if not _is_bridge(opt):
            raise ValueError(f"optimizer mismatch: {type(opt).__name__} is not a torch_bridge optimizer")
        _check_format(sd, opt)
        opt.load_state_dict(sd)
    suite_tx, list_state, opt_params, kwargs = opt._checkpoint_export()
    if torch_params is None:
        C.check_params(params, mapping, [tuple(p.shape) for p in opt_params],
                       [_np_dtype_name(p) for p in opt_params])
    if hyperparams:
        C.kwargs_mismatch(hyperparams, kwargs, f"the checkpoint ({type(opt).__name__})")
    target = tx if tx is not None else suite_tx
    template = jax.eval_shape(target.init, params)
    state = C.tree_state_from_list(list_state, params, mapping, template=template)
    return target, state


def to_torch(opt_state, params, optimizer, *, mapping=None, hyperparams=None,
             torch_names: Optional[Sequence[str]] = None) -> dict:
    """A state dict for ``optimizer.load_state_dict`` from a JAX ``opt_state`` over the Flax ``params``.

    Args:
      opt_state: the state of a suite transformation (the one the bridge class runs, with the same options),
        or of ``optax.sgd``/``adam``/``adamw``.
      params: the Flax parameters it belongs to.
      optimizer: the torch optimizer to resume (a ``torch_bridge`` optimizer, or
        ``torch.optim.{SGD, Adam, AdamW, ASGD}``) on the torch model's parameters. Its param groups (and so
        its hyperparameters) go into the returned state dict; the optimizer itself is left as it was.
      mapping: as in :func:`to_optax`.
      torch_names: as in :func:`to_optax`.
      hyperparams: suite/optax-named hyperparameters the state was produced with; each must equal the
        target optimizer's, else ``ValueError`` naming it.
    """
    mapping = _mapping(params, mapping, torch_names)
    target_params = [p for g in optimizer.param_groups for p in g["params"]]
    C.check_params(params, mapping, [tuple(p.shape) for p in target_params],
                   [_np_dtype_name(p) for p in target_params])
    kind = _optax_kind(opt_state)
    if kind is not None:
        if len(optimizer.param_groups) != 1:
            raise ValueError("an optax state covers one param group")
        _check_group(optimizer.param_groups[0], hyperparams, type(optimizer).__name__)
        return _torch_from_optax(opt_state, params, mapping, optimizer, kind)

    list_state = C.list_state_from_tree(opt_state, params, mapping)
    if _is_bridge(optimizer):
        saved = copy.deepcopy(optimizer.state_dict())
        try:
            _import_into(optimizer, list_state, hyperparams)
            out = copy.deepcopy(optimizer.state_dict())
        finally:
            optimizer.load_state_dict(saved)
        return out
    name = type(optimizer).__name__
    if not (type(optimizer).__module__.startswith("torch.optim") and name in _TORCH_OPTIM):
        raise ValueError(f"optimizer mismatch: {name} is neither a torch_bridge optimizer nor one of "
                         f"torch.optim.{{{', '.join(_TORCH_OPTIM)}}}")
    import torch_bridge

    groups = copy.deepcopy(optimizer.state_dict()["param_groups"])
    tmp = getattr(torch_bridge, name)([p.detach().clone().requires_grad_(True) for p in target_params])
    tmp.load_state_dict({"state": {}, "param_groups": groups})
    _import_into(tmp, list_state, hyperparams)
    out = copy.deepcopy(tmp.state_dict())
    out["param_groups"] = groups
    return out


def _import_into(opt, list_state, hyperparams):
    _, template, _, kwargs = opt._checkpoint_export()
    if hyperparams:
        C.kwargs_mismatch(hyperparams, kwargs, type(opt).__name__)
    C.check_like(list_state, template)
    opt._checkpoint_import(list_state)
