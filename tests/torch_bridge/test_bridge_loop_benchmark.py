"""Smoke test of ``benchmarks/bridge_loop.py --quick`` (one model, one optimizer family, a few iterations).

It checks what the benchmark reports, never a time: every variant is present with positive medians, the
bridge and torch did the same updates, and the profile's sections were actually timed (a rename in the
bridge would otherwise leave zeros in the breakdown).
"""

import math

import pytest

torch = pytest.importorskip("torch")

from benchmarks import bridge_loop  # noqa: E402


def test_quick_loop_reports_every_variant_and_a_nested_profile(capsys, one_torch_thread):
    rows, profiles = bridge_loop.main(["--quick", "--models", "1m6", "--optimizers", "SGD momentum", "--profile"])
    out = capsys.readouterr().out
    assert "load average" in out and "end:" in out
    impls = {r["impl"] for r in rows}
    assert impls == {"torch fused", "torch foreach", "bridge"}
    for r in rows:
        assert r["step"][0] > 0 and r["iter"][0] >= r["step"][0] * 0.5, r
        assert math.isfinite(r["step_ratio"]) and math.isfinite(r["iter_ratio"])
        # Same batch, same initial weights, 8 SGD-momentum iterations in float32: the two runs differ by
        # rounding only (a few ulp of |θ| <~ 0.05 per step, ~1e-8), while torch's parameters move by ~4.5e-4
        # (max over elements) in those 8 iterations, so a bridge that skipped or botched the steps fails 1e-5.
        assert r["diff"] < 1e-5, r
    # the fastest torch implementation is the reference: its ratio is exactly 1, the other's is >= 1
    torch_ratios = sorted(r["step_ratio"] for r in rows if r["impl"].startswith("torch"))
    assert torch_ratios[0] == 1.0 and torch_ratios[1] >= 1.0
    assert set(profiles) == {("1m6", "SGD momentum")}
    for (model, fam), (sections, step_ms) in profiles.items():
        assert step_ms > 0
        # the wrapped sections were hit: the gradient copy and the JAX step take time at every step
        assert sections["sync_grads: _foreach_copy_ (grads -> flat)"] > 0
        assert sections["= JAX step (jit call + wait)"] > 0
        # nested sections: every residual is the enclosing time minus what lies inside it, so >= 0 (timer
        # resolution is ~100 ns; a negative residual means a section was counted twice or not nested)
        for name, ms in sections.items():
            assert ms >= -1e-3, (model, fam, name, ms)
