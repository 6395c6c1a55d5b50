"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch


_CACHE_BEFORE: str | None = None


def pytest_configure(config):
    """Point ``$GTMM_CACHE`` at a fresh temporary folder for the whole run, so the tests' derived files
    (``RolloutWindows`` caches) never land in the real ``~/.cache``. Set here rather than in a fixture because test
    modules build their subprocess environments (``ENV = {**os.environ, ...}``) at import, before any fixture runs."""
    global _CACHE_BEFORE
    _CACHE_BEFORE = os.environ.get("GTMM_CACHE")
    os.environ["GTMM_CACHE"] = tempfile.mkdtemp(prefix="gtmm-test-cache-")


def pytest_unconfigure(config):
    """Remove the run's cache folder and restore ``$GTMM_CACHE``."""
    shutil.rmtree(os.environ.get("GTMM_CACHE", ""), ignore_errors=True)
    if _CACHE_BEFORE is None:
        os.environ.pop("GTMM_CACHE", None)
    else:
        os.environ["GTMM_CACHE"] = _CACHE_BEFORE


@pytest.fixture(scope="session", autouse=True)
def user_cache() -> Path:
    """The run's ``$GTMM_CACHE`` folder (see ``pytest_configure``); autouse so no test can run without it."""
    folder = Path(os.environ["GTMM_CACHE"])
    assert folder.name.startswith("gtmm-test-cache-"), folder
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny models on more threads than free cores only slow down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loss_curve():
    """``curve(model, source, updates, key, **loss_kw) -> [float]``: that many Adam updates (lr 1e-2) of the model's
    whole loss on batches of 8 windows sampled from ``source`` (a ``RolloutSource``), and ``out[key]`` of each: how
    the auxiliary-loss tests watch one term fall."""
    import numpy as np

    from worldmodel.model import batch_to_torch

    def curve(model, source, updates: int, key: str, **loss_kw) -> list[float]:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        rng = np.random.default_rng(0)
        values = []
        for _ in range(updates):
            out = model(batch_to_torch(source.sample(8, rng), "cpu"), **loss_kw)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            values.append(float(out[key].detach()))
        return values

    return curve
