"""Fixtures for the permutation tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are small: one thread avoids OpenMP overhead, which dominates on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
