"""The parity machinery itself: problems agree across frameworks, and the runner can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import problems as P
from parity.references import optax_tx, torch_optim
from parity.runner import ParityCase, compare, run_case


@pytest.mark.parametrize("name", ["mlp", "digits_mlp"])
def test_autograd_problems_agree_across_frameworks(name):
    import jax

    prob = P.get(name)
    with jax.enable_x64(True):
        for step in (0, 3):
            lj, gj = prob.value_and_grad("jax", prob.params("jax", "float64"), step, "float64")
            lt, gt = prob.value_and_grad("torch", prob.params("torch", "float64"), step, "float64")
            assert abs(lj - lt) <= 1e-12 * max(1.0, abs(lt))
            for k in gj:
                np.testing.assert_allclose(np.asarray(gj[k]), gt[k].numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["quad", "rosenbrock"])
def test_numpy_gradient_problems_give_identical_gradients(name):
    prob = P.get(name)
    _, gj = prob.value_and_grad("jax", prob.params("jax", "float32"), 0, "float32")
    _, gt = prob.value_and_grad("torch", prob.params("torch", "float32"), 0, "float32")
    for k in gj:
        assert np.array_equal(np.asarray(gj[k]), gt[k].numpy())


def test_numpy_gradient_matches_finite_differences():
    for name in ("quad", "rosenbrock", "quad_neg"):
        prob = P.get(name)
        p = prob.params()
        f0, g = prob.numpy_value_and_grad(p, 0)
        for k in p:
            flat = p[k].reshape(-1)
            for i in range(min(flat.size, 3)):
                q = {kk: vv.copy() for kk, vv in p.items()}
                q[k].reshape(-1)[i] += 1e-6
                f1, _ = prob.numpy_value_and_grad(q, 0)
                assert abs((f1 - f0) / 1e-6 - g[k].reshape(-1)[i]) < 1e-3 * max(1.0, abs(g[k].reshape(-1)[i]))


def test_models_reproduce_the_problem_forward_pass():
    import jax.numpy as jnp

    prob = P.get("digits_mlp")
    x, _ = P.digits_batch(0)
    params = prob.params()
    expected = P._forward(np, params, x)
    module = P.torch_module(prob, "float64")
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.tensor(x)).numpy(), expected, rtol=1e-12, atol=1e-12)
    for k, v in P.torch_module_params(module).items():
        assert np.array_equal(v, params[k])
    model = P.flax_model(prob, "float32")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x, jnp.float32))), expected, rtol=1e-4, atol=1e-4)
    for k, v in P.flax_model_params(model).items():
        assert np.array_equal(v, params[k].astype(np.float32))
    xtr, ytr, xte, yte = P.digits_data()
    assert len(xte) == 360 and len(xtr) == 1797 - 360
    assert 0.0 <= P.digits_accuracy(params) <= 1.0


def test_compare_reports_abs_and_rel():
    a = {"w": np.array([1.0, 2.0]), "b": np.array(10.0)}
    b = {"w": np.array([1.0, 2.5]), "b": np.array(10.0)}
    assert compare(a, b) == (0.5, 0.2)


def test_runner_detects_a_wrong_reference():
    """A reference with another learning rate must FAIL, and a correct one PASS."""
    good = ParityCase(name="sgd_good", entry="sgd", kwargs=dict(learning_rate=0.05, momentum=0.9),
                      reference=torch_optim("SGD", lr=0.05, momentum=0.9), problem="quad", dtype="float64",
                      steps=10)
    res = run_case(good)
    assert res.status == "PASS", res.reason
    bad = ParityCase(name="sgd_bad", entry="sgd", kwargs=dict(learning_rate=0.05, momentum=0.9),
                     reference=torch_optim("SGD", lr=0.0501, momentum=0.9), problem="quad", dtype="float64",
                     steps=10)
    res = run_case(bad)
    assert res.status == "FAIL" and res.max_abs > 1e-6 and res.atol < 1e-12


def test_runner_flags_an_insensitive_wrong_variant():
    import optax

    case = ParityCase(name="sgd_insensitive", entry="sgd", kwargs=dict(learning_rate=0.05, momentum=0.9),
                      reference=torch_optim("SGD", lr=0.05, momentum=0.9), problem="quad", dtype="float64",
                      steps=5,
                      wrong=optax_tx("optax.sgd", lambda: optax.sgd(0.05, 0.9)))  # not wrong at all
    res = run_case(case)
    assert res.status == "FAIL" and res.sensitivity_ok is False


def test_missing_entry_is_skipped_with_reason():
    case = ParityCase(name="nope", entry="no_such_optimizer", kwargs={}, reference=torch_optim("SGD", lr=0.1),
                      problem="quad", dtype="float32")
    res = run_case(case)
    assert res.status == "SKIP" and "no_such_optimizer" in res.reason


def test_rounding_model_scales_with_the_dtype_and_catches_a_few_hundred_ulps():
    """The error model's δ is a response to one rounding per element and step: float32's is about
    ε32/ε64 = 2^29 times float64's on a linear problem (SGD on ``quad``), and a reference whose learning
    rate is off by 1e-12 relative (≈ 4500 ε64 per step) fails the float64 bar."""
    kw = dict(learning_rate=0.05, momentum=0.9)
    deltas = {}
    for dtype in ("float64", "float32"):
        case = ParityCase(name=f"sgd_model_{dtype}", entry="sgd", kwargs=kw, reference=torch_optim("SGD", lr=0.05, momentum=0.9),
                          problem="quad", dtype=dtype, steps=30)
        res = run_case(case)
        assert res.status == "PASS", res.reason
        deltas[dtype] = res.rounding_abs
        assert res.atol == case.ulps * res.rounding_abs
    ratio = deltas["float32"] / deltas["float64"]
    assert 2 ** 29 / 8 < ratio < 2 ** 29 * 8, ratio
    off = ParityCase(name="sgd_off", entry="sgd", kwargs=kw, reference=torch_optim("SGD", lr=0.05 * (1 + 1e-12), momentum=0.9),
                     problem="quad", dtype="float64", steps=30)
    res = run_case(off)
    assert res.status == "FAIL" and "exceeds" in res.reason, (res.max_abs, res.atol)


def test_a_declared_tolerance_needs_its_reason():
    with pytest.raises(ValueError, match="tolerance_reason"):
        ParityCase(name="declared", entry="sgd", kwargs={}, reference=torch_optim("SGD", lr=0.1),
                   problem="quad", dtype="float64", atol=1e-6)
    case = ParityCase(name="declared", entry="sgd", kwargs=dict(learning_rate=0.05, momentum=0.9),
                      reference=torch_optim("SGD", lr=0.05, momentum=0.9),
                      problem="quad", dtype="float64", steps=3, atol=1e-6, tolerance_reason="a test of declared bars")
    res = run_case(case)
    assert res.status == "PASS" and res.atol == 1e-6 and res.rounding_abs is None, res.reason
