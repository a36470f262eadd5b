"""Training tests import their toy models from toy.py (torch runs on one thread: see tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # toy.py
