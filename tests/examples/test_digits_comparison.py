"""The main job on a tiny configuration: files written, losses decrease, identical starts across backends."""

import json
import sys

import pytest

from examples import digits_comparison as dc
from jaxopt_suite import registry

TINY = dc.DemoConfig(steps=25, batch_size=64, hidden=(16,), seed=0)


def _torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _bridge_available():
    try:
        import torch_bridge  # noqa: F401
    except Exception:  # noqa: BLE001 - the demo reports the bridge rows as unavailable then
        return False
    return True


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    entries = [registry.get("sgd"), registry.get("adam")]
    backends = ("jax", "torch.optim") if _torch_available() else ("jax",)
    if _torch_available() and _bridge_available():
        backends += ("bridge",)
    results = dc.run_comparison(entries, backends, TINY, out, progress=False)
    return out, results


def test_writes_table_json_and_plot(tiny_run):
    out, results = tiny_run
    markdown = (out / "digits_results.md").read_text()
    for r in results:
        assert f"| {r.name} | {r.backend} |" in markdown
    data = json.loads((out / "digits_results.json").read_text())
    assert [(r["name"], r["backend"]) for r in data["results"]] == [(r.name, r.backend) for r in results]
    assert data["config"]["steps"] == TINY.steps
    png = (out / "digits_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_every_row_trains(tiny_run):
    _, results = tiny_run
    assert {r.backend for r in results} >= {"jax"}
    for r in results:
        assert r.status == "ok", (r.name, r.backend, r.reason)
        assert len(r.losses) == TINY.steps
        assert r.final_train_loss < r.initial_train_loss, (r.name, r.backend)
        assert 0.0 <= r.test_accuracy <= 1.0
        assert r.median_step_ms > 0


@pytest.mark.skipif(not _torch_available(), reason="torch not installed")
def test_torch_rows_start_from_the_flax_weights(tiny_run):
    _, results = tiny_run
    by_key = {(r.name, r.backend): r for r in results}
    torch_backends = [b for b in ("torch.optim", "bridge") if (("sgd", b) in by_key)]
    assert "torch.optim" in torch_backends
    for name in ("sgd", "adam"):
        for backend in torch_backends:
            jax_row, torch_row = by_key[(name, "jax")], by_key[(name, backend)]
            # Same initial weights and batches: only float32 rounding separates the two runs.
            assert jax_row.initial_train_loss == pytest.approx(torch_row.initial_train_loss, rel=1e-5)
            assert torch_row.max_param_diff_vs_jax < 1e-4, (name, backend)


def test_missing_bridge_is_reported_not_faked(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "torch_bridge", None)  # makes the import raise ImportError
    results = dc.run_comparison([registry.get("sgd")], ("bridge",), dc.DemoConfig(steps=2, hidden=(4,)),
                                tmp_path, progress=False)
    assert [(r.backend, r.status) for r in results] == [("bridge", "unavailable")]
    assert "torch_bridge not importable" in results[0].reason
    assert results[0].losses == []


def test_torch_kwargs_mapping():
    entry = registry.OptimizerEntry(
        name="t", factory=registry.get("adam").factory, family="adam",
        kwargs={"weight_decay": 0.1}, demo_kwargs={"learning_rate": 0.01, "b2": 0.99},
    )
    assert dc.torch_kwargs(entry) == {"lr": 0.01, "weight_decay": 0.1, "betas": (0.9, 0.99)}
    assert dc.torch_kwargs(registry.get("sgd")) == {"lr": 0.05, "momentum": 0.9}


def test_explicit_torch_kwargs_keep_the_run_seed():
    """``torch_demo_kwargs`` replace the renaming; the run's seed still reaches a stochastic torch row."""
    entry = registry.OptimizerEntry(
        name="t", factory=registry.get("enhanced_sgd").factory, family="enhanced_sgd", stochastic=True,
        demo_kwargs={"learning_rate": 0.05, "centering_axis": -1},
        torch_demo_kwargs={"lr": 0.05, "centering_axis": 0},
    )
    settings = dc.demo_settings(entry, dc.DemoConfig(seed=3))
    assert settings == {"learning_rate": 0.05, "centering_axis": -1, "seed": 3}
    assert dc.torch_kwargs(entry, settings) == {"lr": 0.05, "centering_axis": 0, "seed": 3}
    assert dc.torch_kwargs(entry) == {"lr": 0.05, "centering_axis": 0}


def test_parse_backends_and_selection():
    assert dc.parse_backends("jax,torch") == ("jax", "bridge", "torch.optim")
    assert dc.parse_backends("torch.optim") == ("torch.optim",)
    with pytest.raises(ValueError, match="unknown backend"):
        dc.parse_backends("tensorflow")
    assert [e.name for e in dc.select_entries("adam, sgd")] == ["adam", "sgd"]
    assert len(dc.select_entries(None)) == len(registry.entries())


def test_batches_are_epochs_of_distinct_examples():
    batches = dc.batch_schedule(100, steps=7, batch_size=30, seed=0)
    assert batches.shape == (7, 30)
    epoch = batches[:3].ravel()  # 3 batches of 30 per epoch of 100 examples
    assert len(set(epoch.tolist())) == 90
