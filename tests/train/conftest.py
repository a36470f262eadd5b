"""Training tests run torch on one thread: on a shared 2-core machine OpenMP threads that spin-wait for each
other make tiny matmuls 10-20x slower, and one thread keeps the CPU results reproducible run to run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # toy.py


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
