"""The PyTorch training example runs a few steps, learns, and resumes bitwise from its checkpoint."""

import pytest

pytest.importorskip("sklearn")


@pytest.mark.parametrize("extra", [[], ["--schedule", "cosine", "--grad-scaler", "--asgd"]])
def test_torch_training_example(extra):
    import torch

    from examples import torch_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = torch_training.main(["--steps", "16", *extra])
    finally:
        torch.set_num_threads(threads)
    assert metrics["final_train_loss"] < metrics["initial_train_loss"]
    assert metrics["resume_max_abs_diff"] == 0.0
    if "--asgd" in extra:
        assert 0.0 <= metrics["asgd_averaged_test_accuracy"] <= 1.0
