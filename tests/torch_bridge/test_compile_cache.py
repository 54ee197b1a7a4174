"""No cache growth: bridge instances that differ only in numeric hyperparameters (lr; EnhancedSGD's seed)
share one compiled step and one compiled init (issue 15, item 4).

Per registry entry, 20 instances with different learning rates (EnhancedSGD: different seeds as well,
``seed=None`` among them, which draws a seed per instance) each take one step on parameters of shapes no
other test uses; the bridge's compiled-step and compiled-init caches must grow by exactly one each.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import torch_bridge as tb  # noqa: E402
from jaxopt_suite import registry  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 20
NAMES = registry.names()


def _lr(i: int) -> float:
    return 1e-3 * (1.0 + 0.37 * i)


def _bridge(entry, params, i):
    """The entry's torch-named bridge class, instance ``i`` (lr and, for EnhancedSGD, seed vary)."""
    lr = _lr(i)
    name, cls = entry.name, entry.torch_bridge_class
    if cls in ("SGD", "Adam", "AdamW", "ADOPT"):
        extra = {"momentum": entry.kwargs["momentum"]} if "momentum" in entry.kwargs else {}
        return getattr(tb, cls)(params, lr=lr, **extra)
    if cls == "ASGD":
        return tb.ASGD(params, lr=lr, momentum=entry.kwargs.get("momentum", 0.0))
    if cls == "Lookahead":
        inner = tb.SGD(params, lr=lr, momentum=entry.kwargs["momentum"]) if name == "lookahead_sgd" \
            else tb.Adam(params, lr=lr)
        return tb.Lookahead(inner, k=3, alpha=0.5)
    if cls == "AutoSGM":
        return tb.AutoSGM(params, lr=lr, **entry.kwargs)
    if cls == "ELRA":
        return tb.ELRA(params, lr=lr, **entry.kwargs)
    if cls == "EnhancedSGD":
        return tb.EnhancedSGD(params, lr=lr, seed=None if i % 3 == 0 else 1000 + i)
    raise AssertionError(f"{name}: no bridge construction for {cls!r}; add one to this test")


def _generic(entry, params, i):
    extra = {"seed": 1000 + i} if entry.name == "enhanced_sgd" else {}
    return tb.JaxOptimizer(params, entry.name, lr=_lr(i), **extra)


def _one_step(opt, model, x, entry):
    opt.zero_grad()
    loss = (model(x) ** 2).mean() + 0.1
    loss.backward()
    if isinstance(opt, tb.ELRA):
        opt.step(loss)
    elif entry.requires_value:
        opt.step(value=loss)
    else:
        opt.step()


def _growth(entry, make, width):
    torch.manual_seed(0)
    # shapes of this test only (no other test compiles them): the first instance compiles exactly once
    base = torch.nn.Linear(3, width)
    x = torch.randn(4, 3)
    step0, init0 = tb.compiled_step_cache_size(), tb.compiled_init_cache_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(N):
            model = torch.nn.Linear(3, width)
            model.load_state_dict(base.state_dict())
            opt = make(entry, model.parameters(), i)
            _one_step(opt, model, x, entry)
    return tb.compiled_step_cache_size() - step0, tb.compiled_init_cache_size() - init0


@pytest.mark.parametrize("name", NAMES)
def test_bridge_class_instances_share_one_compiled_step(name):
    entry = registry.get(name)
    steps, inits = _growth(entry, _bridge, 101 + 2 * NAMES.index(name))
    assert (steps, inits) == (1, 1), f"{name}: {N} instances compiled {steps} steps and {inits} inits"


@pytest.mark.parametrize("name", NAMES)
def test_generic_instances_share_one_compiled_step(name):
    entry = registry.get(name)
    steps, inits = _growth(entry, _generic, 102 + 2 * NAMES.index(name))
    assert (steps, inits) == (1, 1), f"{name}: {N} instances compiled {steps} steps and {inits} inits"


def test_enhanced_sgd_seed_still_sets_the_trajectory():
    """Sharing the compiled init does not lose the seed: different seeds give different noise, equal seeds
    the same parameters bit for bit (also against the JAX factory's key for that seed)."""
    import jax
    import numpy as np

    from jaxopt_suite.enhanced_sgd import find_enhanced_state

    def run(seed):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 5)
        opt = tb.EnhancedSGD(model.parameters(), lr=0.05, seed=seed)
        x = torch.randn(8, 3)
        for _ in range(3):
            _one_step(opt, model, x, registry.get("enhanced_sgd"))
        return model.weight.detach().clone(), opt

    a, _ = run(7)
    b, _ = run(7)
    c, _ = run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    fresh = tb.EnhancedSGD(torch.nn.Linear(3, 5).parameters(), seed=2**40 + 3)
    key = find_enhanced_state(fresh._ensure_state()).key
    np.testing.assert_array_equal(np.asarray(key), np.asarray(jax.random.PRNGKey(2**40 + 3)))
