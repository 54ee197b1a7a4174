"""Every registered optimizer trains the same MLP on scikit-learn's digits, in Flax and in PyTorch.

Run from the repository root::

    python -m examples.digits_comparison                    # every entry, every backend, 300 steps
    python -m examples.digits_comparison --only adam,sgd --backends jax,torch --steps 100 --out results/

Backends (``--backends``, comma separated):

* ``jax``: the ``jaxopt_suite`` transformation on a Flax (linen) MLP, one jitted step per iteration;
* ``bridge``: the same optimizer as a ``torch.optim.Optimizer`` from ``torch_bridge`` (entries whose
  ``torch_bridge_class`` exists there), on a ``torch.nn`` copy of the MLP: the torch-named class with
  torch-style arguments when it names them all, else the bridge's generic ``JaxOptimizer`` on the entry;
* ``torch.optim``: torch's own class (entries with a ``torch_class``) as the reference baseline;
* ``torch`` is shorthand for ``bridge,torch.optim``.

Every run starts from the same initial weights (the Flax initialisation, exported to torch), sees the same
minibatches in the same order and uses the registry entry's ``demo_kwargs``; entries that need the loss get it
as ``value=`` (JAX) or through a closure (torch). Rows that cannot run (torch or the bridge missing, no bridge
class, a constructor that rejects the arguments) are reported as unavailable with the reason.

Outputs in ``--out`` (default ``results/``): ``digits_results.md``, ``digits_results.json`` and
``digits_loss.png``. The functions below take registry entries, so other code (and the tests) can run any
subset with a small configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from examples._digits import batch_indices, digits_split

BACKENDS = ("jax", "bridge", "torch.optim")
BACKEND_ALIASES = {"torch": ("bridge", "torch.optim"), "all": BACKENDS}

# optax-style argument names of the JAX factories -> torch-style names of the torch classes.
_TORCH_RENAMES = {"learning_rate": "lr"}
_BETA_NAMES = ("b1", "b2")


# --------------------------------------------------------------------------------------------------
# configuration, data, model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """One comparison's settings (identical for every optimizer and backend)."""

    steps: int = 300
    batch_size: int = 128
    hidden: tuple[int, ...] = (64,)
    seed: int = 0
    test_fraction: float = 0.25
    torch_threads: int = 1


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """The digits split into a training and a held-out test set (float32 features in [0, 1])."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits_data(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """scikit-learn's 8x8 digits (bundled, no download), stratified train/test split with ``seed``."""
    return DigitsData(*digits_split(seed, test_fraction))


def batch_schedule(num_examples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices: shuffled epochs, the same for every run."""
    return batch_indices(num_examples, steps, batch_size, seed)


def make_flax_mlp(hidden: Sequence[int], num_classes: int):
    """A linen MLP: Dense + ReLU per hidden width, then a Dense classifier head."""
    import flax.linen as nn

    class MLP(nn.Module):
        widths: tuple[int, ...]
        classes: int

        @nn.compact
        def __call__(self, x):
            for width in self.widths:
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(self.classes)(x)

    return MLP(tuple(hidden), num_classes)


def init_flax_params(model, num_features: int, seed: int):
    """Initial parameters, shared by every run (float32)."""
    import jax
    import jax.numpy as jnp

    return model.init(jax.random.key(seed), jnp.zeros((1, num_features), jnp.float32))["params"]


def _dense_layers(params) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (kernel, bias) pairs of the Flax MLP in forward order (``Dense_0``, ``Dense_1``...)."""
    names = sorted(params, key=lambda n: int(n.rsplit("_", 1)[1]))
    return [(np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])) for n in names]


def make_torch_mlp(flax_params):
    """A ``torch.nn.Sequential`` with exactly the Flax initial weights (kernels transposed to torch's layout)."""
    import torch

    layers: list[Any] = []
    dense = _dense_layers(flax_params)
    for i, (kernel, bias) in enumerate(dense):
        linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            linear.bias.copy_(torch.from_numpy(bias.copy()))
        layers.append(linear)
        if i < len(dense) - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _flat_numpy(arrays: Iterable[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def flax_params_vector(params) -> np.ndarray:
    """Every weight in torch's order and layout (W as out x in, then b, per layer), as one vector."""
    return _flat_numpy(x for kernel, bias in _dense_layers(params) for x in (kernel.T, bias))


def torch_params_vector(model) -> np.ndarray:
    return _flat_numpy(p.detach().cpu().numpy() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """One (optimizer, backend) row.

    ``status`` is ``"ok"``, ``"diverged"`` (non-finite loss), ``"unavailable"`` (cannot run here; see
    ``reason``) or ``"error"`` (raised while running; see ``reason``).
    """

    name: str
    backend: str
    status: str
    reason: str = ""
    losses: list[float] = dataclasses.field(default_factory=list)
    initial_train_loss: float = math.nan
    final_train_loss: float = math.nan
    test_accuracy: float = math.nan
    median_step_ms: float = math.nan
    first_step_s: float = math.nan
    max_param_diff_vs_jax: float = math.nan
    constructor: str = ""
    final_params: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("final_params")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


class Unavailable(Exception):
    """This (optimizer, backend) pair cannot run in this environment."""


# --------------------------------------------------------------------------------------------------
# JAX backend
# --------------------------------------------------------------------------------------------------


def _cross_entropy_jax(logits, labels):
    import jax
    import jax.numpy as jnp

    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def run_jax(
    entry,
    data: DigitsData,
    config: DemoConfig,
    model,
    init_params,
    batches: np.ndarray,
    on_step: Callable[[], None] = lambda: None,
) -> RunResult:
    """Train with ``entry.build(**entry.demo_kwargs)`` on the Flax MLP; one jitted step per iteration."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = entry.build(**demo_settings(entry, config))
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    def loss_fn(params, x, y):
        return _cross_entropy_jax(model.apply({"params": params}, x), y)

    def train_step(params, opt_state, batch_idx):
        loss, grads = jax.value_and_grad(loss_fn)(params, x_train[batch_idx], y_train[batch_idx])
        extra = {"value": loss} if entry.requires_value else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params):
        train_loss = loss_fn(params, x_train, y_train)
        predictions = jnp.argmax(model.apply({"params": params}, x_test), axis=-1)
        return train_loss, jnp.mean(predictions == y_test)

    step = jax.jit(train_step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.array, init_params)  # a private copy: the step donates its input
    opt_state = jax.jit(tx.init)(params)
    initial_loss = float(evaluate(params)[0])
    losses, times = [], []
    for batch_idx in jnp.asarray(batches):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch_idx)
        loss = jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        on_step()
    train_loss, accuracy = (float(v) for v in evaluate(params))
    result = _finish(entry.name, "jax", losses, times, initial_loss, train_loss, accuracy,
                     flax_params_vector(params))
    result.constructor = f"{entry.factory.__name__}(**{ {**entry.kwargs, **demo_settings(entry, config)} })"
    return result


def _finish(name, backend, losses, times, initial_loss, train_loss, accuracy, params_vector) -> RunResult:
    finite = math.isfinite(train_loss) and all(math.isfinite(v) for v in losses)
    return RunResult(
        name=name,
        backend=backend,
        status="ok" if finite else "diverged",
        losses=losses,
        initial_train_loss=initial_loss,
        final_train_loss=train_loss,
        test_accuracy=accuracy,
        median_step_ms=1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
        first_step_s=times[0] if times else math.nan,
        final_params=params_vector,
    )


# --------------------------------------------------------------------------------------------------
# torch backends (torch_bridge and torch.optim), imported lazily
# --------------------------------------------------------------------------------------------------


def demo_settings(entry, config: DemoConfig) -> dict:
    """The entry's ``demo_kwargs``; a stochastic entry whose factory takes ``seed`` also gets ``config.seed``,
    so that every backend draws the same random stream (and reruns reproduce the table)."""
    settings = dict(entry.demo_kwargs)
    if entry.stochastic and "seed" in inspect.signature(entry.factory).parameters:
        settings.setdefault("seed", config.seed)
    return settings


def _factory_default(entry, name: str) -> Any:
    # unwrap: a factory's signature shows its structural defaults wrapped for optax.inject_hyperparams
    parameter = inspect.signature(inspect.unwrap(entry.factory)).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise Unavailable(f"no torch mapping: {name} has no default in {entry.factory.__name__}")
    return parameter.default


def torch_kwargs(entry, settings: Optional[Mapping[str, Any]] = None) -> dict:
    """Torch-style constructor arguments for ``entry``'s demo settings.

    An entry may state them explicitly (``torch_demo_kwargs``, plus the run's ``seed`` if ``settings`` has
    one); otherwise the JAX arguments (``kwargs`` + ``demo_kwargs``) are renamed the way torch names them: ``learning_rate`` → ``lr`` and
    ``b1``/``b2`` → ``betas`` (a missing one takes the factory's default); other names pass unchanged.
    """
    explicit = getattr(entry, "torch_demo_kwargs", None)
    if explicit is not None:
        out = dict(explicit)
        if settings is not None and "seed" in settings:  # the run's seed (demo_settings), as for the JAX row
            out.setdefault("seed", settings["seed"])
        return out
    merged = {**entry.kwargs, **(entry.demo_kwargs if settings is None else settings)}
    out = {_TORCH_RENAMES.get(k, k): v for k, v in merged.items() if k not in _BETA_NAMES}
    if any(b in merged for b in _BETA_NAMES):
        out["betas"] = tuple(merged[b] if b in merged else _factory_default(entry, b) for b in _BETA_NAMES)
    return out


def _names_all(cls, kwargs: Mapping[str, Any]) -> bool:
    """Whether the constructor names every argument explicitly (a ``**kwargs`` catch-all does not count)."""
    parameters = inspect.signature(cls).parameters
    named = {n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return set(kwargs) <= named


def import_torch_bridge():
    """The ``torch_bridge`` module, or ``Unavailable`` with the import error."""
    try:
        return importlib.import_module("torch_bridge")
    except Exception as exc:  # noqa: BLE001 - any failure to import means the rows cannot run
        raise Unavailable(f"torch_bridge not importable ({type(exc).__name__}: {exc})") from None


def make_torch_optimizer(entry, backend: str, parameters, settings: Optional[Mapping[str, Any]] = None):
    """The optimizer for a torch row and a description of how it was built (``Unavailable`` if it cannot be).

    * ``torch.optim``: ``getattr(torch.optim, entry.torch_class)(params, **torch_kwargs(entry))``.
    * ``bridge``: ``getattr(torch_bridge, entry.torch_bridge_class)(params, **torch_kwargs(entry))`` when that
      class names every argument; otherwise (classes with upstream-style signatures, wrappers such as
      Lookahead) the bridge's generic ``JaxOptimizer(params, entry.name, **settings)``, which runs the
      registry entry itself with the JAX argument names. Arguments are never dropped silently.

    ``settings`` are the entry's JAX-named demo arguments (default ``entry.demo_kwargs``). Returns the
    optimizer and a description of the call.
    """
    settings = dict(entry.demo_kwargs if settings is None else settings)
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch not installed ({exc})") from None
    if backend == "torch.optim":
        if entry.torch_class is None:
            raise Unavailable("no torch.optim class")
        cls, kwargs = getattr(torch.optim, entry.torch_class), torch_kwargs(entry, settings)
        if not _names_all(cls, kwargs):
            raise Unavailable(f"torch.optim.{entry.torch_class} takes no {sorted(set(kwargs) - set(inspect.signature(cls).parameters))}")
        return _construct(cls, parameters, kwargs, f"torch.optim.{entry.torch_class}")
    if entry.torch_bridge_class is None:
        raise Unavailable("no torch_bridge class")
    bridge = import_torch_bridge()
    cls = getattr(bridge, entry.torch_bridge_class, None)
    if cls is None:
        raise Unavailable(f"torch_bridge has no {entry.torch_bridge_class}")
    kwargs = torch_kwargs(entry, settings)
    if _names_all(cls, kwargs):
        return _construct(cls, parameters, kwargs, f"torch_bridge.{entry.torch_bridge_class}")
    generic = getattr(bridge, "JaxOptimizer", None)
    if generic is None:
        raise Unavailable(f"torch_bridge.{entry.torch_bridge_class} takes no {sorted(kwargs)} and there is no JaxOptimizer")
    return _construct(lambda p, **kw: generic(p, entry.name, **kw), parameters, settings,
                      f"torch_bridge.JaxOptimizer({entry.name!r})")


def _construct(cls, parameters, kwargs, label):
    try:
        return cls(parameters, **kwargs), f"{label}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    except (TypeError, ValueError) as exc:
        raise Unavailable(f"{label}(**{kwargs}) failed: {exc}") from None


def has_torch_row(entry, backend: str) -> bool:
    """Whether ``entry`` claims a row on a torch backend (rows it claims but cannot run say why)."""
    return entry.torch_bridge_class is not None if backend == "bridge" else entry.torch_class is not None


def run_torch(
    entry,
    backend: str,
    data: DigitsData,
    config: DemoConfig,
    init_params,
    batches: np.ndarray,
    on_step: Callable[[], None] = lambda: None,
) -> RunResult:
    """Train the torch copy of the MLP with the bridge class or torch.optim's class of ``entry``.

    Each step is ``optimizer.step(closure)`` where the closure zeroes the grads, runs forward and backward
    and returns the loss: the standard torch protocol, through which loss-driven optimizers get the loss.
    """
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch not installed ({exc})") from None

    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)  # optimizers that draw a seed from torch's generator reproduce across runs
    model = make_torch_mlp(init_params)
    optimizer, constructor = make_torch_optimizer(entry, backend, model.parameters(), demo_settings(entry, config))
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train).long()
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test).long()
    loss_fn = torch.nn.functional.cross_entropy

    def evaluate():
        with torch.no_grad():
            train_loss = float(loss_fn(model(x_train), y_train))
            accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
        return train_loss, accuracy

    initial_loss = evaluate()[0]
    losses, times = [], []
    for batch_idx in torch.from_numpy(batches.astype(np.int64)):
        xb, yb = x_train[batch_idx], y_train[batch_idx]

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        start = time.perf_counter()
        loss = optimizer.step(closure)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()) if hasattr(loss, "detach") else float(loss))
        on_step()
    train_loss, accuracy = evaluate()
    result = _finish(entry.name, backend, losses, times, initial_loss, train_loss, accuracy,
                     torch_params_vector(model))
    result.constructor = constructor
    return result


# --------------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------------


def parse_backends(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"jax,torch"`` → ``("jax", "bridge", "torch.optim")``; unknown names raise ``ValueError``."""
    tokens = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for token in (t.strip() for t in tokens if t.strip()):
        expanded = BACKEND_ALIASES.get(token, (token,))
        for backend in expanded:
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {token!r}; expected some of {list(BACKENDS)} or torch, all")
            if backend not in out:
                out.append(backend)
    return tuple(out)


def select_entries(only: Optional[str | Sequence[str]] = None) -> list:
    """Registry entries in registration order, optionally only the named ones (unknown names raise)."""
    from jaxopt_suite import registry

    if not only:
        return registry.entries()
    names = only.split(",") if isinstance(only, str) else list(only)
    return [registry.get(n.strip()) for n in names if n.strip()]


def planned_rows(entries: Sequence, backends: Sequence[str]) -> list[tuple[Any, str]]:
    return [(e, b) for e in entries for b in backends if b == "jax" or has_torch_row(e, b)]


def run_comparison(
    entries: Sequence,
    backends: Sequence[str] = BACKENDS,
    config: DemoConfig = DemoConfig(),
    out_dir: str | pathlib.Path = "results",
    progress: bool = True,
    console=None,
) -> list[RunResult]:
    """Run every (entry, backend) pair, then write the table (md, json) and the loss plot to ``out_dir``."""
    data = load_digits_data(config.seed, config.test_fraction)
    model = make_flax_mlp(config.hidden, data.num_classes)
    init_params = init_flax_params(model, data.num_features, config.seed)
    batches = batch_schedule(len(data.x_train), config.steps, config.batch_size, config.seed + 1)
    rows = planned_rows(entries, backends)

    results: list[RunResult] = []
    with _progress_display(progress, len(rows) * config.steps, console) as advance:
        for entry, backend in rows:
            advance(label=f"{entry.name} · {backend}", steps=0)
            tick = lambda: advance(steps=1)  # noqa: E731
            try:
                if backend == "jax":
                    result = run_jax(entry, data, config, model, init_params, batches, tick)
                else:
                    result = run_torch(entry, backend, data, config, init_params, batches, tick)
            except Unavailable as exc:
                result = RunResult(entry.name, backend, "unavailable", reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - one failing optimizer must not hide the others
                result = RunResult(entry.name, backend, "error", reason=f"{type(exc).__name__}: {exc}")
            advance(steps=config.steps - len(result.losses))  # rows that stopped early
            results.append(result)

    _fill_param_diffs(results)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "digits_results.md").write_text(results_markdown(results, config))
    (out_dir / "digits_results.json").write_text(json.dumps(results_json(results, config), indent=1))
    plot_losses(results, out_dir / "digits_loss.png")
    return results


def _fill_param_diffs(results: list[RunResult]) -> None:
    """For torch rows: max |θ_torch − θ_jax| of the final weights of the same optimizer."""
    jax_params = {r.name: r.final_params for r in results if r.backend == "jax" and r.final_params is not None}
    for r in results:
        if r.backend != "jax" and r.final_params is not None and r.name in jax_params:
            r.max_param_diff_vs_jax = float(np.max(np.abs(r.final_params - jax_params[r.name])))


class _progress_display:
    """A rich progress bar over all steps of all rows (a no-op when disabled or rich is missing)."""

    def __init__(self, enabled: bool, total: int, console=None):
        self.enabled, self.total, self.console = enabled, total, console
        self.progress = None

    def __enter__(self):
        if self.enabled:
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)
            except ImportError:
                return self._advance
            self.progress = Progress(
                TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("starting", total=self.total)
        return self._advance

    def _advance(self, steps: int = 1, label: Optional[str] = None):
        if self.progress is not None:
            self.progress.update(self.task, advance=steps, **({"description": label} if label else {}))

    def __exit__(self, *exc_info):
        if self.progress is not None:
            self.progress.stop()
        return False


# --------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("optimizer", "backend", "final train loss", "test accuracy", "median step (ms)",
                 "max |Δθ| vs jax", "status", "note")


def _fmt(value: float, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def table_rows(results: Sequence[RunResult]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        rows.append((
            r.name, r.backend, _fmt(r.final_train_loss, ".4f"), _fmt(r.test_accuracy, ".3f"),
            _fmt(r.median_step_ms, ".3f"), _fmt(r.max_param_diff_vs_jax, ".2e"), r.status,
            r.reason or (r.constructor if r.backend != "jax" else ""),
        ))
    return rows


def results_markdown(results: Sequence[RunResult], config: DemoConfig) -> str:
    lines = [
        "# Digits MLP: every registered optimizer",
        "",
        f"MLP 64-{'-'.join(map(str, config.hidden))}-10 (ReLU), cross-entropy, {config.steps} steps of "
        f"minibatch {config.batch_size}, seed {config.seed}, held-out fraction {config.test_fraction}. "
        "Same initial weights and batches for every row. Final train loss is over the full training set; "
        "step time is the median over steps after the first (which includes compilation). "
        "max |Δθ| compares a torch row's final weights with the JAX row of the same optimizer.",
        "",
        _markdown_row(TABLE_COLUMNS),
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += [_markdown_row(row) for row in table_rows(results)]
    return "\n".join(lines) + "\n"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def results_json(results: Sequence[RunResult], config: DemoConfig) -> dict:
    versions = {}
    for module in ("jax", "optax", "flax", "torch", "numpy", "sklearn"):
        try:
            versions[module] = importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as absent
            versions[module] = None
    return {
        "config": dataclasses.asdict(config),
        "environment": {"python": platform.python_version(), "platform": platform.platform(), **versions},
        "results": [r.to_json() for r in results],
    }


def plot_losses(results: Sequence[RunResult], path: str | pathlib.Path, smoothing: float = 0.9) -> None:
    """One panel per backend: each optimizer's minibatch loss (exponential moving average), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [b for b in BACKENDS if any(r.backend == b for r in results)] or ["jax"]
    names = list(dict.fromkeys(r.name for r in results))
    palette = plt.get_cmap("tab10")
    styles = {n: (palette(i % 10), ("-", "--", ":", "-.")[(i // 10) % 4]) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.5), sharey=True, squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for r in results:
            if r.backend != backend or not r.losses:
                continue
            color, linestyle = styles[r.name]
            ax.plot(_ema(r.losses, smoothing), color=color, linestyle=linestyle, label=r.name, lw=1.3)
        ax.set_title(backend)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"minibatch loss (EMA {smoothing})")
    handles, labels = [], []
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("digits MLP: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _ema(values: Sequence[float], smoothing: float) -> np.ndarray:
    out = np.empty(len(values))
    acc = values[0]
    for i, v in enumerate(values):
        acc = smoothing * acc + (1 - smoothing) * v if math.isfinite(v) else math.nan
        out[i] = acc
    return out


def print_table(results: Sequence[RunResult], console=None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("\t".join(TABLE_COLUMNS))
        for row in table_rows(results):
            print("\t".join(row))
        return
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or pipe: wide enough for the numeric columns
            console = Console(width=120)
    table = Table(title="digits MLP")
    notes: dict[str, int] = {}
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column in ("optimizer", "backend", "status", "note") else "right")
    for row in table_rows(results):
        *cells, reason = row
        mark = str(notes.setdefault(reason, len(notes) + 1)) if reason else ""
        table.add_row(*cells, mark)
    console.print(table)
    for reason, number in notes.items():
        console.print(f"  [{number}] {reason}", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.digits_comparison", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--batch-size", type=int, default=DemoConfig.batch_size)
    parser.add_argument("--hidden", default=",".join(map(str, DemoConfig.hidden)), help="hidden widths, e.g. 64,32")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--only", default=None, help="comma-separated registry names (default: all)")
    parser.add_argument("--backends", default="all", help="jax, bridge, torch.optim; torch = bridge,torch.optim")
    parser.add_argument("--out", default="results", help="output folder")
    parser.add_argument("--torch-threads", type=int, default=DemoConfig.torch_threads)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> list[RunResult]:
    args = build_parser().parse_args(argv)
    config = DemoConfig(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, torch_threads=args.torch_threads,
        hidden=tuple(int(w) for w in args.hidden.split(",") if w.strip()),
    )
    results = run_comparison(select_entries(args.only), parse_backends(args.backends), config, args.out,
                             progress=not args.no_progress)
    print_table(results)
    print(f"wrote {pathlib.Path(args.out) / 'digits_results.md'}, .json and digits_loss.png")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
