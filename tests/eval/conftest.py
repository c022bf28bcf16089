"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP threads that wait for each other make a
    tiny model's forward 10-100× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
