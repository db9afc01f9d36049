"""Shared fixtures: checkpoints go under pytest's tmp_path (a real file system here, so
O_DIRECT is exercised; on tmpfs the engines fall back and say so)."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(autouse=True)
def _no_lightning_noise() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
