"""Step-by-step comparison of a JAX transformation with a reference optimizer (torch or JAX).

Two problems (torch_semantics.md §7):
* ``quad``: two leaves, an SPD quadratic in n = 20 (eigenvalues 0.05–5) and a diagonal one in m = 7,
  with the gradient computed in numpy float64 and cast to the run dtype for both sides, so that only the
  optimizer arithmetic differs;
* ``mlp``: an 8-16-1 tanh network, MSE on a batch of 64, each framework using its own autograd.

Each side steps its own trajectory; :func:`compare` returns the max over steps and leaves of
``|θ_ours − θ_ref|``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

DTYPES = {"f64": (np.float64, torch.float64), "f32": (np.float32, torch.float32)}


@contextlib.contextmanager
def precision(name: str):
    """x64 on for ``"f64"`` (also torch's default dtype is left alone), off for ``"f32"``."""
    with jax.enable_x64(name == "f64"):
        yield


# ------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------


def _quad_data():
    rng = np.random.default_rng(1234)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    a = (q * np.geomspace(0.05, 5.0, 20)) @ q.T
    a = 0.5 * (a + a.T)
    star_a = rng.uniform(-3.0, 3.0, 20)
    diag_b = np.geomspace(0.05, 5.0, 7)
    star_b = rng.uniform(-3.0, 3.0, 7)
    sign = rng.choice([-1.0, 1.0], 27)
    init = sign * rng.uniform(1.0, 15.0, 27)
    return a, star_a, diag_b, star_b, [init[:20], init[20:]]


_QUAD = _quad_data()


def quad_init() -> list[np.ndarray]:
    return [x.copy() for x in _QUAD[4]]


def quad_grad(params: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Gradient in numpy float64 of ½(a−a*)ᵀA(a−a*) + ½Σ d(b−b*)² (complex leaves: torch's convention)."""
    a, star_a, diag_b, star_b, _ = _QUAD
    pa = np.asarray(params[0]).astype(np.complex128 if np.iscomplexobj(params[0]) else np.float64)
    pb = np.asarray(params[1]).astype(np.complex128 if np.iscomplexobj(params[1]) else np.float64)
    return [a @ (pa - star_a), diag_b * (pb - star_b)]


def complex_quad_init() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    init = quad_init()
    return [x + 1j * rng.uniform(-5.0, 5.0, x.shape) for x in init]


def _mlp_data():
    rng = np.random.default_rng(99)
    x = rng.normal(size=(64, 8))
    y = np.sin(x.sum(axis=1, keepdims=True)) + 0.1 * x[:, :1]
    init = [
        rng.normal(size=(8, 16)) * 0.6,
        rng.normal(size=(16,)) * 0.1,
        rng.normal(size=(16, 1)) * 0.4,
        rng.normal(size=(1,)) * 0.1,
    ]
    return x, y, init


_MLP = _mlp_data()


def mlp_init() -> list[np.ndarray]:
    return [p.copy() for p in _MLP[2]]


def _mlp_loss_jax(params, x, y):
    w1, b1, w2, b2 = params
    out = jnp.tanh(x @ w1 + b1) @ w2 + b2
    return jnp.mean((out - y) ** 2)


def _mlp_loss_torch(params, x, y):
    w1, b1, w2, b2 = params
    out = torch.tanh(x @ w1 + b1) @ w2 + b2
    return torch.mean((out - y) ** 2)


_MLP_GRAD = jax.jit(jax.grad(_mlp_loss_jax))

PROBLEMS = {"quad": quad_init, "mlp": mlp_init, "cquad": complex_quad_init}


# ------------------------------------------------------------------------------------------------
# sides
# ------------------------------------------------------------------------------------------------


def _run_dtype(np_dtype, init):
    if np.iscomplexobj(init[0]):
        return np.complex128 if np_dtype == np.float64 else np.complex64
    return np_dtype


class JaxSide:
    """Our transformation (or an optax reference) stepping a list-of-arrays pytree.

    ``to_params``/``from_params`` let a reference keep a different params structure (optax's
    ``LookaheadParams``); ``transform_grad`` maps torch-convention gradients to what the tx expects.
    """

    def __init__(self, tx, problem: str, dtype: str, *, wrap=None, unwrap=None, pass_params=True):
        np_dtype = DTYPES[dtype][0]
        init = PROBLEMS[problem]()
        self.problem = problem
        self.dtype = _run_dtype(np_dtype, init)
        fast = [jnp.asarray(p.astype(self.dtype)) for p in init]
        self.wrap = wrap or (lambda p: p)
        self.unwrap = unwrap or (lambda p: p)
        self.params = self.wrap(fast)
        self.state = tx.init(self.params)
        if problem == "mlp":
            self.x = jnp.asarray(_MLP[0].astype(self.dtype))
            self.y = jnp.asarray(_MLP[1].astype(self.dtype))
            self._grad = _MLP_GRAD

        def step(grads, state, params, mask):
            kwargs = {} if mask is None else {"grad_mask": mask}
            updates, state = tx.update(grads, state, params if pass_params else None, **kwargs)
            return optax.apply_updates(params, updates), state

        self._step = jax.jit(step)

    def fast(self) -> list[np.ndarray]:
        return [np.asarray(p) for p in self.unwrap(self.params)]

    def grads(self):
        fast = self.unwrap(self.params)
        if self.problem == "mlp":
            return list(self._grad(fast, self.x, self.y))
        return [jnp.asarray(g.astype(self.dtype)) for g in quad_grad([np.asarray(p) for p in fast])]

    def step(self, mask: Optional[Sequence[bool]] = None):
        grads = self.grads()
        jmask = None if mask is None else [jnp.asarray(m) for m in mask]
        self.params, self.state = self._step(grads, self.state, self.params, jmask)


class TorchSide:
    """A torch optimizer (``make(params) -> Optimizer``) on the same problem; None grads where mask is False."""

    def __init__(self, make: Callable, problem: str, dtype: str):
        np_dtype = DTYPES[dtype][0]
        init = PROBLEMS[problem]()
        self.problem = problem
        self.dtype = _run_dtype(np_dtype, init)
        self.params = [torch.tensor(p.astype(self.dtype), requires_grad=True) for p in init]
        self.opt = make(self.params)
        if problem == "mlp":
            self.x = torch.tensor(_MLP[0].astype(self.dtype))
            self.y = torch.tensor(_MLP[1].astype(self.dtype))

    def fast(self) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in self.params]

    def step(self, mask: Optional[Sequence[bool]] = None, before_step: Optional[Callable] = None):
        for p in self.params:
            p.grad = None
        if self.problem == "mlp":
            loss = _mlp_loss_torch(self.params, self.x, self.y)
            loss.backward()
        else:
            grads = quad_grad(self.fast())
            for p, g in zip(self.params, grads):
                p.grad = torch.tensor(g.astype(self.dtype))
        if mask is not None:
            for p, m in zip(self.params, mask):
                if not m:
                    p.grad = None
        if before_step is not None:
            before_step(self)
        self.opt.step()


def max_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def compare(ours, ref, steps: int = 200, masks: Optional[Callable[[int], Optional[list]]] = None,
            before_ref_step: Optional[Callable] = None) -> float:
    """Step both sides ``steps`` times; the max over steps and leaves of |θ_ours − θ_ref|."""
    worst = max_diff(ours.fast(), ref.fast())
    for t in range(steps):
        mask = None if masks is None else masks(t)
        ours.step(mask)
        if isinstance(ref, TorchSide):
            ref.step(mask, before_ref_step)
        else:
            ref.step(mask)
        worst = max(worst, max_diff(ours.fast(), ref.fast()))
        if not np.isfinite(worst):
            return float("inf")
    return worst


# ------------------------------------------------------------------------------------------------
# flat layout (the torch bridge's packed buffer) against the pytree layout
# ------------------------------------------------------------------------------------------------


def flat_vs_tree(make_tx: Callable, steps: int = 30, masks: Optional[Callable[[int], Optional[list]]] = None):
    """Run ``make_tx(segments=None)`` on the quad pytree and ``make_tx(segments=layout)`` on the same
    params packed into one padded flat buffer; return (max |Δθ|, max |padding|, flat state)."""
    from jaxopt_suite._common import FlatLayout

    init = quad_init()
    layout = FlatLayout.from_shapes([p.shape for p in init], align_elements=16)

    def pack(leaves):
        buf = np.zeros(layout.total, dtype=np.asarray(leaves[0]).dtype)
        for off, num, leaf in zip(layout.offsets, layout.numels, leaves):
            buf[off:off + num] = np.asarray(leaf).ravel()
        return buf

    def unpack(buf):
        buf = np.asarray(buf)
        return [buf[off:off + num] for off, num in zip(layout.offsets, layout.numels)]

    tree_tx, flat_tx = make_tx(segments=None), make_tx(segments=layout)
    tree = [jnp.asarray(p) for p in init]
    flat = [jnp.asarray(pack(init))]
    tree_state, flat_state = tree_tx.init(tree), flat_tx.init(flat)

    def step(tx):
        def fn(g, s, p, m):
            kwargs = {} if m is None else {"grad_mask": m}
            u, s = tx.update(g, s, p, **kwargs)
            return optax.apply_updates(p, u), s
        return jax.jit(fn)

    tree_step, flat_step = step(tree_tx), step(flat_tx)
    worst, pad = 0.0, 0.0
    dead = np.ones(layout.total, bool)
    for off, num in zip(layout.offsets, layout.numels):
        dead[off:off + num] = False
    for t in range(steps):
        mask = None if masks is None else masks(t)
        g_tree = [jnp.asarray(g) for g in quad_grad([np.asarray(p) for p in tree])]
        g_flat = [jnp.asarray(pack(quad_grad(unpack(flat[0]))))]
        m_tree = None if mask is None else [jnp.asarray(m) for m in mask]
        m_flat = None if mask is None else [jnp.asarray(np.array(list(mask) + [True]))]
        tree, tree_state = tree_step(g_tree, tree_state, tree, m_tree)
        flat, flat_state = flat_step(g_flat, flat_state, flat, m_flat)
        worst = max(worst, max_diff([np.asarray(p) for p in tree], unpack(flat[0])))
        pad = max(pad, float(np.max(np.abs(np.asarray(flat[0])[dead]))))
    return worst, pad, flat_state


def find_state(state, cls):
    """The first sub-state of type ``cls`` in a nested optimizer state (depth-first)."""
    if isinstance(state, cls):
        return state
    if isinstance(state, dict):
        children = list(state.values())
    elif isinstance(state, (tuple, list)):
        children = list(state)
    else:
        return None
    for child in children:
        found = find_state(child, cls)
        if found is not None:
            return found
    return None
