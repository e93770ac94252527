"""Shared fixtures: the digits dataset and two tiny finished runs, trained once per test session.

The run folders are shared by every test that asks for them: treat them as read-only (copy one with
``shutil.copytree`` before changing it).

Torch runs every test on one thread: on a 2-core machine, two spinning OpenMP threads per process next
to another busy process can make a one-second run take minutes. The suite runs in parallel processes
(``pytest -n 2``) instead, which keeps both cores busy without oversubscribing them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bockd.config import build_config
from bockd.data import ImageDataset, load_dataset
from bockd.engine import Trainer
from bockd.services import ServicesInfo, down, up

NUM_STUDENTS = 3
BASELINE_STUDENT = 1  # 0-based: the baseline run is S2's

TINY = {
    "model": {"arch": "resnet20", "num_students": NUM_STUDENTS},
    "epochs": 1,
    "batch_size": 64,
    "runtime": {"progress": "off"},
}


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="session", autouse=True)
def single_thread() -> Iterator[None]:
    with _torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def ensemble_run(digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch BOC-KD run: resnet20, 3 students, digits."""
    workdir = tmp_path_factory.mktemp("runs") / "ensemble"
    with _torch_threads(1):
        Trainer(build_config("smoke", TINY), digits, workdir).fit()
    return workdir


@pytest.fixture(scope="session")
def baseline_run(digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch baseline run of S2 (cross-entropy only), same schedule as ``ensemble_run``."""
    workdir = tmp_path_factory.mktemp("runs") / "baseline-s2"
    config = build_config("smoke", {**TINY, "mode": "baseline", "student": BASELINE_STUDENT})
    with _torch_threads(1):
        Trainer(config, digits, workdir).fit()
    return workdir


@pytest.fixture(scope="module")
def mlflow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServicesInfo]:
    """The embedded S3 + MLflow servers for one test module, with their client variables in os.environ
    (the MLflow client reads the S3 credentials from there); stopped and the environment restored after."""
    state = tmp_path_factory.mktemp("services")
    saved = dict(os.environ)
    try:
        info = up(state, timeout=90)
        os.environ.update(info.env())
        yield info
    finally:
        os.environ.clear()
        os.environ.update(saved)
        down(state)
