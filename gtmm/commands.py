"""Console scripts (``pip install`` puts them on PATH beside ``python -m ...``): each runs one command's ``main``
through the shared entry wrapper. The module is imported lazily so ``gtmm-inspect`` does not pay for torch."""

from __future__ import annotations

import importlib
from typing import NoReturn

from gtmm import cli


def _run(module: str) -> NoReturn:
    cli.run(importlib.import_module(module).main)


def collect() -> NoReturn:
    """``gtmm-collect`` = ``python -m rollouts.collect``."""
    _run("rollouts.collect")


def inspect() -> NoReturn:
    """``gtmm-inspect`` = ``python -m rollouts.inspect``."""
    _run("rollouts.inspect")


def export() -> NoReturn:
    """``gtmm-export`` = ``python -m rollouts.export``."""
    _run("rollouts.export")


def train() -> NoReturn:
    """``gtmm-train`` = ``python -m worldmodel.train``."""
    _run("worldmodel.train")


def evaluate() -> NoReturn:
    """``gtmm-evaluate`` = ``python -m worldmodel.evaluate``."""
    _run("worldmodel.evaluate")


def report() -> NoReturn:
    """``gtmm-report`` = ``python -m worldmodel.report``."""
    _run("worldmodel.report")


def dream() -> NoReturn:
    """``gtmm-dream`` = ``python -m worldmodel.dream``."""
    _run("worldmodel.dream")


def train_sb3() -> NoReturn:
    """``gtmm-train-sb3`` = ``python -m agents.train_sb3``."""
    _run("agents.train_sb3")


def pretrained() -> NoReturn:
    """``gtmm-pretrained`` = ``python -m worldmodel.pretrained``."""
    _run("worldmodel.pretrained")
