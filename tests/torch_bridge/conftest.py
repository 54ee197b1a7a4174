"""Shared fixtures of the torch bridge tests."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch intra-op thread, restoring the previous count afterwards.

    torch's intra-op threads spin against each other on a loaded 2-core machine (measured 30x slower on the
    digits tests). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
