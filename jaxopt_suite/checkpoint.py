"""Optimizer state across frameworks: the pure-JAX half (no torch import).

A PyTorch model and its Flax twin hold the same parameters in another order and layout: torch lists
``model.parameters()`` (``0.weight, 0.bias, 2.weight, ...``) with ``Linear.weight`` of shape ``(out, in)`` and
``Conv.weight`` ``(O, I, *spatial)``; Flax has a pytree of paths (``layers/0/bias, layers/0/kernel, ...``, sorted
by key) with ``Dense``/``Linear`` kernels ``(in, out)`` and ``Conv`` kernels ``(*spatial, I, O)``. A
:class:`ParamMapping` says, for torch parameter ``i``, which Flax leaf it is and which axis permutation ``π``
carries it over::

    flax_leaf = transpose(torch_param, π)        torch_param = transpose(flax_leaf, π⁻¹)

Optimizer state moves with the same rule: a per-element state leaf (a moment, a momentum buffer, ASGD's
``ax``, Lookahead's slow weights) is the same function of the same elements, so it is permuted exactly as its
parameter; a per-parameter scalar (a step count, ASGD's ``eta``/``mu``) and a global leaf (a PRNG key, ELRA's
or EnhancedSGD's controller scalars, Lookahead's counter) are copied bit for bit. A transposition is exact
(no arithmetic), so an elementwise optimizer resumed in the other framework continues the same trajectory.
What is *not* layout-free: an optimizer that indexes by element position or by axis (EnhancedSGD's per-leaf
noise draw and its centering axis) sees other elements at a given position after a transpose or a reordering;
its converted state is still exact, but the continuation is then a different, equally valid run (see
``parity/cases_resume.py`` for the measured statement).

The bridge's state walking (which leaves of an optimizer state are per parameter, which are global) lives here
so that ``torch_bridge`` and the conversions share one implementation: :func:`walk_state`, :func:`rebuild_state`.

Conversions here are between two layouts of the *same* transformation's state:

* the **list layout**: the state of ``tx`` over a Python list of the parameters in torch order and torch layout
  (what ``torch_bridge`` keeps on its per-tensor path and maps to ``state_dict()`` entries);
* the **tree layout**: the state of ``tx`` over the Flax pytree (what ``tx.init(params)`` gives).

:func:`tree_state_from_list` and :func:`list_state_from_tree` convert between them; ``torch_bridge.checkpoint``
adds the torch half (state dicts, ``torch.save`` files, ``torch.optim`` and ``optax`` sources).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._common import STACKED_FIELDS_ATTR

__all__ = [
    "ParamMapping",
    "default_mapping",
    "leaf_paths",
    "list_state_from_tree",
    "rebuild_state",
    "tree_state_from_list",
    "walk_state",
]


# --------------------------------------------------------------------------------------------------
# state walking (shared with torch_bridge): per-parameter subtrees vs global leaves
# --------------------------------------------------------------------------------------------------


def _is_namedtuple(node) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def is_per_param(node, params_def) -> bool:
    """Whether ``node`` is a per-parameter subtree: a container shaped like the params (``params_def``).

    With a list of parameters (the bridge) only a ``list`` of that length qualifies, so a state tuple that
    happens to have as many leaves is never mistaken for one.
    """
    if node is None or _is_namedtuple(node):
        return False
    if params_def == jax.tree.structure([0] * params_def.num_leaves):
        return isinstance(node, list) and jax.tree.structure(node) == params_def
    if params_def.num_leaves == 1 and params_def == jax.tree.structure(0):
        return False  # a bare array as params: every leaf would match
    return jax.tree.structure(node) == params_def


def is_stacked(node, field: str, child, params_def) -> bool:
    """Whether ``node.field`` holds one scalar per parameter stacked in a vector (``STACKED_FIELDS_ATTR``)."""
    return (field in getattr(type(node), STACKED_FIELDS_ATTR, ())
            and hasattr(child, "shape") and tuple(child.shape) == (params_def.num_leaves,))


def walk_state(node, params_def, path=(), out=None):
    """List ``(path, subtree, is_per_param)`` over an optimizer state.

    ``path`` names the way down: ``"StateClass.field"`` for a NamedTuple field, the index for a tuple or list
    entry, the key for a dict. A per-parameter subtree (shaped like the params, see :func:`is_per_param`) is
    one entry; so is a stacked per-parameter vector (``STACKED_FIELDS_ATTR``), given as the list of its
    entries (entry ``i`` for leaf ``i``). Every other leaf is global.
    """
    if out is None:
        out = []
    if node is None:
        return out
    if is_per_param(node, params_def):
        out.append((path, node, True))
        return out
    if _is_namedtuple(node):
        for field in node._fields:
            child, child_path = getattr(node, field), path + (f"{type(node).__name__}.{field}",)
            if is_stacked(node, field, child, params_def):
                out.append((child_path, list(np.asarray(child)), True))
            else:
                walk_state(child, params_def, child_path, out)
    elif isinstance(node, (tuple, list)):
        for i, child in enumerate(node):
            walk_state(child, params_def, path + (str(i),), out)
    elif isinstance(node, dict):
        for key in sorted(node):
            walk_state(node[key], params_def, path + (str(key),), out)
    else:
        out.append((path, node, False))
    return out


def rebuild_state(node, params_def, replacements, path=()):
    """``node`` with the subtrees at the paths of ``replacements`` replaced (stacked vectors re-stacked)."""
    if path in replacements:
        return replacements[path]
    if node is None:
        return None
    if is_per_param(node, params_def):
        return node
    if _is_namedtuple(node):
        children = []
        for f in node._fields:
            child = getattr(node, f)
            new = rebuild_state(child, params_def, replacements, path + (f"{type(node).__name__}.{f}",))
            if is_stacked(node, f, child, params_def) and isinstance(new, list):
                new = jnp.stack([jnp.asarray(x, child.dtype).reshape(()) for x in new])
            children.append(new)
        return type(node)(*children)
    if isinstance(node, (tuple, list)):
        return type(node)(rebuild_state(c, params_def, replacements, path + (str(i),)) for i, c in enumerate(node))
    if isinstance(node, dict):
        return {k: rebuild_state(node[k], params_def, replacements, path + (str(k),)) for k in node}
    return node


def field_matches(path: tuple[str, ...], spec: str) -> bool:
    """Whether ``path`` ends in the field ``spec`` (``"field"``, ``"StateClass.field"`` or a full path)."""
    if not path:
        return False
    last = path[-1]
    return last == spec or last.split(".", 1)[-1] == spec or "/".join(path) == spec


# --------------------------------------------------------------------------------------------------
# the parameter mapping
# --------------------------------------------------------------------------------------------------


def leaf_paths(params) -> list[str]:
    """The ``/``-joined key paths of the leaves of ``params``, in leaf order (``"layers/0/kernel"``).

    The ``value`` attribute of a Flax NNX variable is not part of the path (``nnx.state(model, nnx.Param)``
    gives ``"layers/0/kernel"``, as a linen params dict does).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [_path_str(p) for p, _ in flat]


def _path_str(path) -> str:
    # A Flax NNX variable (``nnx.Param``) is a pytree node whose one child is the attribute ``value``:
    # ``nnx.state(model, nnx.Param)`` flattens to ``.../kernel/value``. The variable's own name is the path.
    if len(path) > 1 and type(path[-1]).__name__ == "GetAttrKey" and getattr(path[-1], "name", None) == "value":
        path = path[:-1]
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _inverse(axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(axes))


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """Torch parameter ``i`` is the Flax leaf at ``paths[i]``, with ``flax = transpose(torch, axes[i])``.

    ``axes[i]`` is ``None`` for the identity. Build one with :func:`default_mapping` (standard layers) or
    :meth:`from_pairs` (anything else)::

        ParamMapping.from_pairs([("w1", None), ("b1", None)])           # same layout, torch order w1, b1
        ParamMapping.from_pairs([("Dense_0/kernel", (1, 0)), ("Dense_0/bias", None)])
    """

    paths: tuple[str, ...]
    axes: tuple[Optional[tuple[int, ...]], ...]

    def __post_init__(self):
        if len(self.paths) != len(self.axes):
            raise ValueError(f"ParamMapping: {len(self.paths)} paths but {len(self.axes)} axes")
        if len(set(self.paths)) != len(self.paths):
            dup = sorted({p for p in self.paths if self.paths.count(p) > 1})
            raise ValueError(f"ParamMapping: paths {dup} appear more than once")
        for p, ax in zip(self.paths, self.axes):
            if ax is not None and sorted(ax) != list(range(len(ax))):
                raise ValueError(f"ParamMapping: axes {ax} of {p!r} are not a permutation")

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, Optional[Sequence[int]]]]) -> "ParamMapping":
        """From ``[(flax_path, axes or None), ...]`` in torch parameter order."""
        return cls(tuple(str(p) for p, _ in pairs), tuple(None if a is None else tuple(int(i) for i in a)
                                                            for _, a in pairs))

    def __len__(self) -> int:
        return len(self.paths)

    def to_flax(self, i: int, value):
        """Torch-layout array of parameter ``i`` in the Flax layout."""
        ax = self.axes[i]
        return value if ax is None or np.ndim(value) == 0 else jnp.transpose(jnp.asarray(value), ax)

    def to_torch(self, i: int, value):
        """Flax-layout array of parameter ``i`` in the torch layout."""
        ax = self.axes[i]
        return value if ax is None or np.ndim(value) == 0 else jnp.transpose(jnp.asarray(value), _inverse(ax))

    def torch_shape(self, i: int, flax_shape: Sequence[int]) -> tuple[int, ...]:
        ax = self.axes[i]
        shape = tuple(flax_shape)
        if ax is None:
            return shape
        if len(ax) != len(shape):
            raise ValueError(f"parameter {self.paths[i]!r}: axes {ax} do not fit its shape {shape}")
        inv = _inverse(ax)
        return tuple(shape[j] for j in inv)

    def order(self, params) -> list[int]:
        """``order[i]`` = the leaf index of torch parameter ``i`` in ``params``; every leaf must be mapped."""
        paths = leaf_paths(params)
        index = {p: j for j, p in enumerate(paths)}
        missing = [p for p in self.paths if p not in index]
        if missing:
            raise ValueError(f"ParamMapping: paths {missing} are not leaves of the params (leaves: {paths})")
        unmapped = sorted(set(paths) - set(self.paths))
        if unmapped:
            raise ValueError(f"ParamMapping: params leaves {unmapped} have no torch parameter")
        return [index[p] for p in self.paths]

    def torch_params(self, params) -> list:
        """The Flax ``params`` as a list in torch order and torch layout (JAX arrays)."""
        leaves = jax.tree.leaves(params)
        return [self.to_torch(i, leaves[j]) for i, j in enumerate(self.order(params))]


# Flax leaf names that hold a torch module's ``weight`` (first in torch's registration order) and whether
# their layout differs from torch's.
_WEIGHT_NAMES = {"kernel": True, "scale": False, "embedding": False}


def _kernel_axes(ndim: int) -> Optional[tuple[int, ...]]:
    """``flax = transpose(torch, axes)`` for a Linear (2-D) or Conv (3-D and up) weight."""
    if ndim < 2:
        return None
    # torch (O, I, *spatial) -> flax (*spatial, I, O)
    return tuple(range(2, ndim)) + (1, 0)


def default_mapping(params, torch_names: Optional[Sequence[str]] = None) -> ParamMapping:
    """The mapping for the same architecture built from standard layers in both frameworks.

    Flax leaves are grouped by their parent module (in the params' leaf order, which is the module order for
    ``nnx.List`` / ``Dense_0, Dense_1, ...`` naming with fewer than ten layers per level, and for named
    attributes whose alphabetical order is the torch construction order). Within a module, torch registers
    ``weight`` before ``bias``: the leaf named ``kernel``/``scale``/``embedding`` comes first (a ``kernel``
    transposed: ``(in, out)`` ⇄ ``(out, in)``, Conv ``(*spatial, I, O)`` ⇄ ``(O, I, *spatial)``), then
    ``bias``, then any other leaf in leaf order (same layout).

    ``torch_names`` (``[n for n, _ in model.named_parameters()]``), when given, is checked against this:
    the counts must agree and each torch ``...weight``/``...bias`` must meet a weight-like / ``bias`` leaf, so
    a different module order raises instead of silently pairing the wrong tensors. For anything else build
    a :class:`ParamMapping` by hand.
    """
    paths = leaf_paths(params)
    shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
    modules: dict[str, list[int]] = {}
    for j, p in enumerate(paths):
        parent = p.rsplit("/", 1)[0] if "/" in p else ""
        modules.setdefault(parent, []).append(j)
    pairs = []
    for members in modules.values():
        names = [paths[j].rsplit("/", 1)[-1] for j in members]
        weights = [j for j, n in zip(members, names) if n in _WEIGHT_NAMES]
        biases = [j for j, n in zip(members, names) if n == "bias"]
        others = [j for j in members if j not in weights and j not in biases]
        for j in weights + biases + others:
            name = paths[j].rsplit("/", 1)[-1]
            axes = _kernel_axes(len(shapes[j])) if _WEIGHT_NAMES.get(name, False) else None
            pairs.append((paths[j], axes))
    mapping = ParamMapping.from_pairs(pairs)
    if torch_names is not None:
        torch_names = list(torch_names)
        if len(torch_names) != len(pairs):
            raise ValueError(f"default_mapping: torch has {len(torch_names)} parameters, the Flax params "
                             f"{len(pairs)}; pass a ParamMapping")
        for tname, (fpath, _) in zip(torch_names, pairs):
            tleaf, fleaf = tname.rsplit(".", 1)[-1], fpath.rsplit("/", 1)[-1]
            ok = (tleaf == "bias") == (fleaf == "bias") and (tleaf != "weight" or fleaf in _WEIGHT_NAMES)
            if not ok:
                raise ValueError(f"default_mapping: torch parameter {tname!r} meets Flax leaf {fpath!r}; "
                                 "the module orders differ, pass a ParamMapping")
    return mapping


# --------------------------------------------------------------------------------------------------
# list layout <-> tree layout of one transformation's state
# --------------------------------------------------------------------------------------------------


def _list_def(n: int):
    return jax.tree.structure([0] * n)


def _leaf_to_flax(mapping: ParamMapping, i: int, leaf, torch_shape, where: str):
    shape = tuple(np.shape(leaf))
    if shape == tuple(torch_shape):
        return mapping.to_flax(i, leaf)
    if shape == ():
        return leaf  # a per-parameter scalar: copied
    raise ValueError(f"{where} of parameter {mapping.paths[i]!r} has shape {shape}; expected the "
                     f"parameter's torch shape {tuple(torch_shape)} or a scalar")


def _leaf_to_torch(mapping: ParamMapping, i: int, leaf, flax_shape, where: str):
    shape = tuple(np.shape(leaf))
    if shape == tuple(flax_shape):
        return mapping.to_torch(i, leaf)
    if shape == ():
        return leaf
    raise ValueError(f"{where} of parameter {mapping.paths[i]!r} has shape {shape}; expected the "
                     f"parameter's shape {tuple(flax_shape)} or a scalar")


def _where(path) -> str:
    return "state " + ("/".join(path) if path else "(root)")


def tree_state_from_list(list_state, params, mapping: ParamMapping, template=None):
    """The tree-layout state (over the Flax ``params``) of a list-layout state (torch order and layout).

    Per-parameter leaves move to their Flax leaf (permuted by the mapping's axes); stacked per-parameter
    vectors are reordered; global leaves are copied. When ``template`` (``tx.init(params)`` or its
    ``jax.eval_shape``) is given, the result must match it leaf for leaf (structure, shape, dtype), else a
    ``ValueError`` names the first leaf that differs.
    """
    order = mapping.order(params)
    n = len(order)
    tree_def = jax.tree.structure(params)
    flax_leaves = jax.tree.leaves(params)
    torch_shapes = [mapping.torch_shape(i, np.shape(flax_leaves[j])) for i, j in enumerate(order)]
    replacements = {}
    for path, sub, per_param in walk_state(list_state, _list_def(n)):
        if not per_param:
            continue
        placed = [None] * n
        for i, j in enumerate(order):
            placed[j] = _leaf_to_flax(mapping, i, sub[i], torch_shapes[i], _where(path))
        if isinstance(sub, list) and len(sub) == n and all(np.ndim(x) == 0 for x in sub) and _stacked_at(
                list_state, path, n):
            replacements[path] = placed  # re-stacked by rebuild_state
        else:
            replacements[path] = tree_def.unflatten(placed)
    out = rebuild_state(list_state, _list_def(n), replacements)
    if template is not None:
        check_like(out, template)
    return out


def _stacked_at(state, path, n) -> bool:
    """Whether ``path`` in ``state`` is a stacked per-parameter vector field."""
    node = state
    for part in path[:-1]:
        node = _child(node, part)
    cls_field = path[-1]
    if not _is_namedtuple(node) or "." not in cls_field:
        return False
    field = cls_field.split(".", 1)[1]
    return is_stacked(node, field, getattr(node, field), _list_def(n))


def _child(node, part):
    if _is_namedtuple(node) and "." in part:
        return getattr(node, part.split(".", 1)[1])
    if isinstance(node, (tuple, list)):
        return node[int(part)]
    if isinstance(node, dict):
        for k in node:
            if str(k) == part:
                return node[k]
    raise KeyError(part)


def list_state_from_tree(tree_state, params, mapping: ParamMapping):
    """The list-layout state (torch order and layout) of a tree-layout state over the Flax ``params``."""
    order = mapping.order(params)
    n = len(order)
    tree_def = jax.tree.structure(params)
    flax_leaves = jax.tree.leaves(params)
    replacements = {}
    for path, sub, per_param in walk_state(tree_state, tree_def):
        if not per_param:
            continue
        if isinstance(sub, list) and _stacked_at_tree(tree_state, path, tree_def):
            replacements[path] = [sub[j] for j in order]
            continue
        leaves = tree_def.flatten_up_to(sub)
        replacements[path] = [_leaf_to_torch(mapping, i, leaves[j], np.shape(flax_leaves[j]), _where(path))
                              for i, j in enumerate(order)]
    return _rebuild_list(tree_state, tree_def, n, replacements)


def _stacked_at_tree(state, path, tree_def) -> bool:
    node = state
    for part in path[:-1]:
        node = _child(node, part)
    if not _is_namedtuple(node) or "." not in path[-1]:
        return False
    field = path[-1].split(".", 1)[1]
    return is_stacked(node, field, getattr(node, field), tree_def)


def _rebuild_list(node, tree_def, n, replacements, path=()):
    """:func:`rebuild_state` for the tree -> list direction (stacked vectors re-stacked in torch order)."""
    if path in replacements:
        return replacements[path]
    if node is None or is_per_param(node, tree_def):
        return node
    if _is_namedtuple(node):
        children = []
        for f in node._fields:
            child = getattr(node, f)
            new = _rebuild_list(child, tree_def, n, replacements, path + (f"{type(node).__name__}.{f}",))
            if is_stacked(node, f, child, tree_def) and isinstance(new, list):
                new = jnp.stack([jnp.asarray(x, child.dtype).reshape(()) for x in new])
            children.append(new)
        return type(node)(*children)
    if isinstance(node, (tuple, list)):
        return type(node)(_rebuild_list(c, tree_def, n, replacements, path + (str(i),)) for i, c in enumerate(node))
    if isinstance(node, dict):
        return {k: _rebuild_list(node[k], tree_def, n, replacements, path + (str(k),)) for k in node}
    return node


def check_like(state, template) -> None:
    """``ValueError`` naming the first leaf where ``state`` and ``template`` differ (structure, shape, dtype)."""
    s_flat, s_def = jax.tree_util.tree_flatten_with_path(state)
    t_flat, t_def = jax.tree_util.tree_flatten_with_path(template)
    if s_def != t_def:
        raise ValueError("optimizer mismatch: the converted state is not structured like the target "
                         f"transformation's state\n  converted: {s_def}\n  target:    {t_def}")
    for (path, a), (_, b) in zip(s_flat, t_flat):
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            raise ValueError(f"state leaf {_path_str(path)!r} has shape {tuple(np.shape(a))}, the target "
                             f"transformation expects {tuple(np.shape(b))}")
        if jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
            raise ValueError(f"state leaf {_path_str(path)!r} has dtype {jnp.dtype(a.dtype)}, the target "
                             f"transformation expects {jnp.dtype(b.dtype)}")


def check_params(params, mapping: ParamMapping, torch_shapes: Optional[Sequence[Sequence[int]]] = None,
                 torch_dtypes: Optional[Sequence[Any]] = None, torch_names: Optional[Sequence[str]] = None):
    """Check the Flax ``params`` against the torch side's shapes/dtypes through ``mapping`` (clear errors).

    ``torch_dtypes`` are numpy-compatible dtype names (``"float32"``...).
    """
    order = mapping.order(params)
    leaves = jax.tree.leaves(params)
    if torch_shapes is not None and len(torch_shapes) != len(order):
        raise ValueError(f"the torch side has {len(torch_shapes)} parameters, the mapping {len(order)}")
    for i, j in enumerate(order):
        label = mapping.paths[i] + (f" (torch {torch_names[i]!r})" if torch_names is not None else
                                    f" (torch parameter {i})")
        expect = mapping.torch_shape(i, np.shape(leaves[j]))
        if torch_shapes is not None and tuple(torch_shapes[i]) != expect:
            raise ValueError(f"shape mismatch for parameter {label}: torch {tuple(torch_shapes[i])}, Flax "
                             f"{tuple(np.shape(leaves[j]))} maps to {expect}")
        if torch_dtypes is not None and jnp.dtype(torch_dtypes[i]) != jnp.dtype(leaves[j].dtype):
            raise ValueError(f"dtype mismatch for parameter {label}: torch {jnp.dtype(torch_dtypes[i])}, "
                             f"Flax {jnp.dtype(leaves[j].dtype)}")


def kwargs_mismatch(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str) -> None:
    """``ValueError`` naming the first hyperparameter of ``expected`` that ``actual`` lacks or sets otherwise."""
    for name, want in expected.items():
        if name not in actual:
            raise ValueError(f"hyperparameter mismatch: {what} has no {name!r} (it has {sorted(actual)})")
        have = actual[name]
        same = (np.allclose(float(want), float(have), rtol=1e-12, atol=0.0)
                if _is_number(want) and _is_number(have) else want == have)
        if not same:
            raise ValueError(f"hyperparameter mismatch: {name}={want!r} expected, {what} has {name}={have!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
