"""``examples/cross_backend_resume.py`` on a short run: PyTorch half, torch.save, conversion, orbax, Flax half."""

import os

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("matplotlib")

STEPS = 12
# float32 gradients of two frameworks (different roundings): the loss curves agree to ~1e-6 (measured
# 8e-7 over 2 x 100 steps); the bar leaves room, and the resume without optimizer state must miss it by far
BAR = 1e-5


def test_resumed_curve_matches_the_uninterrupted_one(tmp_path, capsys):
    from examples import cross_backend_resume

    m = cross_backend_resume.main(["--steps", str(STEPS), "--out-dir", str(tmp_path), "--every", "4"])
    assert len(m["resumed"]) == len(m["uninterrupted"]) == 2 * STEPS
    assert m["max_diff_first_half"] < BAR
    assert m["max_diff_second_half"] < BAR
    assert m["max_diff_fresh_state"] > 10 * BAR  # the conversion carries state that matters
    assert m["resumed"][-1] < m["resumed"][0]
    assert os.path.getsize(m["plot"]) > 0
    out = capsys.readouterr().out
    assert "max |resumed - uninterrupted|" in out and "second half (Flax, resumed)" in out
