"""Test problems defined once, with identical initial values for JAX and PyTorch.

Every problem has float64 numpy initial parameters (a dict ``name -> array`` in a fixed order) and a
``value_and_grad(framework, params, step, dtype)`` that returns the loss and the gradient in the given
framework's own arrays:

* ``quad`` and ``rosenbrock`` compute the gradient in numpy float64 from the current parameters and cast it
  to the run dtype for both frameworks, so two runs differ only by the optimizer arithmetic;
* ``mlp`` (8-16-1 tanh, MSE on a batch of 64) and ``digits_mlp`` (scikit-learn digits, 64-32-10 tanh,
  cross-entropy on mini-batches in a fixed order) use each framework's own autograd.

Parameters use the ``x @ W + b`` layout (Flax's ``kernel``) in both frameworks; :func:`torch_module` and
:func:`flax_model` build ``nn.Sequential`` / ``nnx`` models with the same weights for the MLPs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import numpy as np

Params = dict  # name -> array, in the problem's order

FRAMEWORKS = ("jax", "torch")


# --------------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------------


def to_numpy(params: Mapping[str, Any]) -> Params:
    """Any framework's params (jax arrays, torch tensors, numpy) as numpy arrays (same dtype)."""
    out = {}
    for name, value in params.items():
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().numpy()
        out[name] = np.array(value)
    return out


def as_jax(params: Mapping[str, Any], dtype: str) -> Params:
    """numpy params as a JAX pytree (a dict) of ``dtype`` (float64 needs x64 enabled)."""
    import jax.numpy as jnp

    return {k: jnp.asarray(np.asarray(v, dtype=dtype)) for k, v in params.items()}


def as_torch(params: Mapping[str, Any], dtype: str) -> Params:
    """numpy params as (fresh, contiguous) torch tensors of ``dtype``."""
    import torch

    return {k: torch.tensor(np.asarray(v, dtype=dtype)) for k, v in params.items()}


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[str(dtype)]


# --------------------------------------------------------------------------------------------------
# the problem type
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """A parity problem.

    Attributes:
      name: registry key.
      init: float64 numpy initial parameters (called each time; returns fresh arrays).
      numpy_value_and_grad: ``(params_f64, step) -> (loss, grads_f64)`` for problems whose gradient is
        computed in numpy float64 (``None`` for autograd problems).
      batch: ``step -> (x, y)`` numpy float64 inputs and targets of autograd problems.
      jax_loss: ``(params, x, y) -> loss`` for autograd problems.
      torch_loss: ``(params, x, y) -> loss`` for autograd problems.
      description: one line.
    """

    name: str
    init: Callable[[], Params]
    numpy_value_and_grad: Optional[Callable[[Params, int], tuple[float, Params]]] = None
    batch: Optional[Callable[[int], tuple[np.ndarray, np.ndarray]]] = None
    jax_loss: Optional[Callable[..., Any]] = None
    torch_loss: Optional[Callable[..., Any]] = None
    description: str = ""

    @property
    def numpy_gradient(self) -> bool:
        return self.numpy_value_and_grad is not None

    def params(self, framework: str = "numpy", dtype: str = "float64") -> Params:
        """Initial params as numpy (``framework="numpy"``), a JAX pytree or torch tensors."""
        p = self.init()
        if framework == "numpy":
            return {k: v.astype(dtype) for k, v in p.items()}
        if framework == "jax":
            return as_jax(p, dtype)
        if framework == "torch":
            return as_torch(p, dtype)
        raise ValueError(f"unknown framework {framework!r}; expected 'numpy', 'jax' or 'torch'")

    def value_and_grad(self, framework: str, params: Params, step: int, dtype: str):
        """Loss and gradient at ``params`` (the framework's arrays) for mini-batch ``step``.

        Returns ``(loss, grads)``: ``loss`` a Python float, ``grads`` a dict in the framework's arrays of
        ``dtype``.
        """
        if self.numpy_gradient:
            p64 = {k: np.asarray(v, dtype=np.float64) for k, v in to_numpy(params).items()}
            loss, g = self.numpy_value_and_grad(p64, step)
            g = {k: v.astype(dtype) for k, v in g.items()}
            return float(loss), (as_jax(g, dtype) if framework == "jax" else as_torch(g, dtype))
        x, y = self.batch(step)
        if framework == "jax":
            import jax.numpy as jnp

            x = jnp.asarray(x, dtype) if np.issubdtype(x.dtype, np.floating) else jnp.asarray(x)
            y = jnp.asarray(y, dtype) if np.issubdtype(y.dtype, np.floating) else jnp.asarray(y)
            loss, g = _jax_value_and_grad(self.jax_loss)(params, x, y)
            return float(loss), g
        if framework == "torch":
            import torch

            x = torch.tensor(x, dtype=_torch_dtype(dtype)) if np.issubdtype(x.dtype, np.floating) else torch.tensor(x)
            y = torch.tensor(y, dtype=_torch_dtype(dtype)) if np.issubdtype(y.dtype, np.floating) else torch.tensor(y)
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss = self.torch_loss(leaves, x, y)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            return float(loss.detach()), {k: g.detach() for k, g in zip(leaves, grads)}
        raise ValueError(f"unknown framework {framework!r}")


@functools.lru_cache(maxsize=None)
def _jax_value_and_grad(loss):
    import jax

    return jax.jit(jax.value_and_grad(loss))


# --------------------------------------------------------------------------------------------------
# quad: two independent quadratics, n = 20 (eigenvalues 0.05..5) and m = 7
# --------------------------------------------------------------------------------------------------


def _spd(n: int, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.geomspace(low, high, n)) @ q.T


@functools.lru_cache(maxsize=None)
def _quad_data():
    rng = np.random.default_rng(20240601)
    a = _spd(20, 0.05, 5.0, rng)
    b = _spd(7, 0.2, 2.0, rng)
    ca = rng.standard_normal(20)
    cb = rng.standard_normal(7)
    a0 = rng.choice([-1.0, 1.0], 20) * rng.uniform(1.0, 15.0, 20)
    b0 = rng.choice([-1.0, 1.0], 7) * rng.uniform(1.0, 15.0, 7)
    return a, b, ca, cb, a0, b0


def _quad_init() -> Params:
    *_, a0, b0 = _quad_data()
    return {"a": a0.copy(), "b": b0.copy()}


def _quad_value_and_grad(p: Params, step: int):
    del step
    a, b, ca, cb, _, _ = _quad_data()
    ra, rb = p["a"] - ca, p["b"] - cb
    ga, gb = a @ ra, b @ rb
    return 0.5 * (ra @ ga + rb @ gb), {"a": ga, "b": gb}


# --------------------------------------------------------------------------------------------------
# rosenbrock (a = 1, b = 100) on two leaves: a pair of 2-d valleys, one a 0-d/1-d mix
# --------------------------------------------------------------------------------------------------


def _rosen_init() -> Params:
    return {"x": np.array([-1.2, 1.0]), "y": np.array(0.5)}


def _rosen_value_and_grad(p: Params, step: int):
    del step
    x0, x1 = p["x"]
    y = p["y"]
    # f = (1 - x0)^2 + 100 (x1 - x0^2)^2 + (1 - x1)^2 + 100 (y - x1^2)^2   (chained Rosenbrock, n = 3)
    f = (1 - x0) ** 2 + 100 * (x1 - x0**2) ** 2 + (1 - x1) ** 2 + 100 * (y - x1**2) ** 2
    g0 = -2 * (1 - x0) - 400 * x0 * (x1 - x0**2)
    g1 = 200 * (x1 - x0**2) - 2 * (1 - x1) - 400 * x1 * (y - x1**2)
    gy = 200 * (y - x1**2)
    return f, {"x": np.array([g0, g1]), "y": np.array(gy)}


# --------------------------------------------------------------------------------------------------
# MLPs (x @ W + b layout, tanh hidden layer)
# --------------------------------------------------------------------------------------------------


def _glorot(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-limit, limit, (n_in, n_out))


def _mlp_init_params(sizes: tuple[int, ...], seed: int) -> Params:
    rng = np.random.default_rng(seed)
    p = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        p[f"w{i + 1}"] = _glorot(rng, n_in, n_out)
        p[f"b{i + 1}"] = rng.uniform(-0.1, 0.1, n_out)
    return p


def _forward(xp, params: Params, x):
    """tanh MLP forward pass written once for jax.numpy and torch."""
    n_layers = len(params) // 2
    h = x
    for i in range(1, n_layers + 1):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < n_layers:
            h = xp.tanh(h)
    return h


@functools.lru_cache(maxsize=None)
def _mlp_data():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 8))
    y = np.sin(x @ rng.standard_normal((8, 1)))
    return x, y


def _mlp_init() -> Params:
    return _mlp_init_params((8, 16, 1), seed=11)


def _mlp_batch(step: int):
    del step  # one fixed batch
    return _mlp_data()


def _mlp_jax_loss(params, x, y):
    import jax.numpy as jnp

    return jnp.mean((_forward(jnp, params, x) - y) ** 2)


def _mlp_torch_loss(params, x, y):
    import torch

    return torch.mean((_forward(torch, params, x) - y) ** 2)


# --------------------------------------------------------------------------------------------------
# digits MLP: scikit-learn load_digits, 64-32-10 tanh, cross-entropy, batches of 64 in a fixed order
# --------------------------------------------------------------------------------------------------

DIGITS_SIZES = (64, 32, 10)
DIGITS_BATCH = 64
DIGITS_SEED = 0


@functools.lru_cache(maxsize=None)
def digits_data():
    """``(x_train, y_train, x_test, y_test)``: pixels / 16 in float64, int64 labels; 360 held-out samples."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SEED).permutation(len(x))
    test, train = perm[:360], perm[360:]
    return x[train], y[train], x[test], y[test]


def digits_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The mini-batch of ``step``: epochs of a fixed per-epoch permutation, batches of 64 (last one dropped)."""
    x, y, _, _ = digits_data()
    per_epoch = len(x) // DIGITS_BATCH
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng(DIGITS_SEED + 1 + epoch).permutation(len(x))
    idx = order[k * DIGITS_BATCH : (k + 1) * DIGITS_BATCH]
    return x[idx], y[idx]


def _digits_init() -> Params:
    return _mlp_init_params(DIGITS_SIZES, seed=DIGITS_SEED)


def _digits_jax_loss(params, x, y):
    import jax
    import jax.numpy as jnp

    logits = _forward(jnp, params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _digits_torch_loss(params, x, y):
    import torch

    return torch.nn.functional.cross_entropy(_forward(torch, params, x), y)


def digits_accuracy(params: Mapping[str, Any], split: str = "test") -> float:
    """Classification accuracy of numpy/jax/torch ``params`` on the ``"train"`` or ``"test"`` split."""
    xtr, ytr, xte, yte = digits_data()
    x, y = (xte, yte) if split == "test" else (xtr, ytr)
    p = {k: v.astype(np.float64) for k, v in to_numpy(params).items()}
    return float(np.mean(np.argmax(_forward(np, p, x), axis=1) == y))


# --------------------------------------------------------------------------------------------------
# model helpers for the MLP problems
# --------------------------------------------------------------------------------------------------


def _layer_sizes(params: Mapping[str, Any]) -> list[tuple[int, int]]:
    n_layers = len(params) // 2
    return [tuple(np.shape(params[f"w{i}"])) for i in range(1, n_layers + 1)]


def torch_module(problem: "Problem | str", dtype: str = "float32"):
    """An ``nn.Sequential`` (Linear, Tanh, ..., Linear) with the problem's initial weights.

    torch's ``Linear.weight`` is ``(out, in)``: it holds the transpose of the problem's ``w``.
    """
    import torch

    problem = get(problem) if isinstance(problem, str) else problem
    params = problem.init()
    layers = []
    sizes = _layer_sizes(params)
    for i, (n_in, n_out) in enumerate(sizes, start=1):
        lin = torch.nn.Linear(n_in, n_out, dtype=_torch_dtype(dtype))
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(params[f"w{i}"].T.copy()))
            lin.bias.copy_(torch.tensor(params[f"b{i}"]))
        layers.append(lin)
        if i < len(sizes):
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def torch_module_params(module) -> Params:
    """The problem-layout numpy params of a :func:`torch_module` model (weights transposed back)."""
    linears = [m for m in module if hasattr(m, "weight")]
    out = {}
    for i, lin in enumerate(linears, start=1):
        out[f"w{i}"] = lin.weight.detach().cpu().numpy().T.copy()
        out[f"b{i}"] = lin.bias.detach().cpu().numpy().copy()
    return out


def flax_model(problem: "Problem | str", dtype: str = "float32"):
    """A Flax NNX model (``nnx.Linear`` layers, tanh) with the problem's initial weights.

    Call it on a batch ``x`` of shape ``(batch, in)``. float64 needs x64 enabled.
    """
    import jax.numpy as jnp
    from flax import nnx

    problem = get(problem) if isinstance(problem, str) else problem
    params = problem.init()
    sizes = _layer_sizes(params)

    class MLP(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.layers = nnx.List(
                [nnx.Linear(n_in, n_out, param_dtype=jnp.dtype(dtype), rngs=rngs) for n_in, n_out in sizes]
            )

        def __call__(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = jnp.tanh(x)
            return x

    model = MLP()
    for i, layer in enumerate(model.layers, start=1):
        layer.kernel[...] = jnp.asarray(params[f"w{i}"], dtype)
        layer.bias[...] = jnp.asarray(params[f"b{i}"], dtype)
    return model


def flax_model_params(model) -> Params:
    """The problem-layout numpy params of a :func:`flax_model` model."""
    out = {}
    for i, layer in enumerate(model.layers, start=1):
        out[f"w{i}"] = np.asarray(layer.kernel[...])
        out[f"b{i}"] = np.asarray(layer.bias[...])
    return out


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------

PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("quad", _quad_init, numpy_value_and_grad=_quad_value_and_grad,
                description="two SPD quadratics (n=20, eigenvalues 0.05..5; m=7), numpy float64 gradient"),
        Problem("rosenbrock", _rosen_init, numpy_value_and_grad=_rosen_value_and_grad,
                description="chained Rosenbrock (a=1, b=100) on a 2-vector and a 0-d leaf, numpy gradient"),
        Problem("mlp", _mlp_init, batch=_mlp_batch, jax_loss=_mlp_jax_loss, torch_loss=_mlp_torch_loss,
                description="8-16-1 tanh MLP, MSE on a fixed batch of 64, each framework's autograd"),
        Problem("digits_mlp", _digits_init, batch=digits_batch, jax_loss=_digits_jax_loss, torch_loss=_digits_torch_loss,
                description="scikit-learn digits, 64-32-10 tanh MLP, cross-entropy, batches of 64"),
    )
}


def negated(problem: Problem) -> Problem:
    """``problem`` with the loss and gradient negated (for ``maximize=True`` runs, which then converge)."""

    def neg_numpy(p, step):
        loss, g = problem.numpy_value_and_grad(p, step)
        return -loss, {k: -v for k, v in g.items()}

    def neg(loss_fn):
        return None if loss_fn is None else (lambda params, x, y: -loss_fn(params, x, y))

    return dataclasses.replace(
        problem,
        name=f"{problem.name}_neg",
        numpy_value_and_grad=None if problem.numpy_value_and_grad is None else neg_numpy,
        jax_loss=neg(problem.jax_loss),
        torch_loss=neg(problem.torch_loss),
        description=f"negated {problem.name} (maximize it)",
    )


for _name in ("quad", "mlp"):
    PROBLEMS[f"{_name}_neg"] = negated(PROBLEMS[_name])


def get(name: str) -> Problem:
    """The problem called ``name``."""
    try:
        return PROBLEMS[name]
    except KeyError:
        raise KeyError(f"unknown problem {name!r}; known: {sorted(PROBLEMS)}") from None
