"""Shared fixtures: the digits dataset and two tiny finished runs, trained once per test session; the
embedded S3 + MLflow servers, started once per test process; under ``pytest -n N`` whole modules per worker.

The run folders are shared by every test that asks for them: treat them as read-only (copy one with
``shutil.copytree`` before changing it).

Torch runs every test on one thread: on a 2-core machine, two spinning OpenMP threads per process next
to another busy process can make a one-second run take minutes. The suite runs in parallel processes
(``pytest -n 2``) instead, which keeps both cores busy without oversubscribing them.
``BOCKD_TEST_THREADS=N`` runs them on N threads instead, to check that no tolerance depends on it (the
bit-exact DDP comparison of test_distributed.py needs 1, the thread count of its ranks).
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
from bockd.platform.services import ServicesInfo, down, up

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


TEST_THREADS = int(os.environ.get("BOCKD_TEST_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def single_thread() -> Iterator[None]:
    with _torch_threads(TEST_THREADS):
        yield


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def ensemble_run(digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch BOC-KD run: resnet20, 3 students, digits."""
    workdir = tmp_path_factory.mktemp("runs") / "ensemble"
    with _torch_threads(TEST_THREADS):
        Trainer(build_config("smoke", TINY), digits, workdir).fit()
    return workdir


@pytest.fixture(scope="session")
def baseline_run(digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch baseline run of S2 (cross-entropy only), same schedule as ``ensemble_run``."""
    workdir = tmp_path_factory.mktemp("runs") / "baseline-s2"
    config = build_config("smoke", {**TINY, "mode": "baseline", "student": BASELINE_STUDENT})
    with _torch_threads(TEST_THREADS):
        Trainer(config, digits, workdir).fit()
    return workdir


@pytest.fixture(scope="session")
def val_split_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the cascade step reads: ``data/``, digits prepared with a validation split (data.val_fraction
    0.2, held out of training), and ``model/``, a 3-student ensemble trained on exactly that data, every
    student exported with ONNX (the pipeline's train_ensemble step). Three epochs (about 20 s) take the
    students well past chance (roughly 70-85 % top-1) with spread-out confidences: the cascade has
    something to route."""
    from bockd.pipeline import steps

    root = tmp_path_factory.mktemp("val-split-family")
    trained = {**TINY, "epochs": 3, "batch_size": 32, "data": {"val_fraction": 0.2}}
    raw = build_config("smoke", trained).to_dict()
    steps.prepare_data(raw, root / "data")
    with _torch_threads(TEST_THREADS):
        steps.train_ensemble(raw, root / "data", root / "model")
    return root


@pytest.fixture(scope="session")
def services_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServicesInfo]:
    """The embedded S3 + MLflow servers, started once per test process (each xdist worker) on first use
    and stopped at its end. Modules share them, so each names its own experiments, models and keys."""
    state = tmp_path_factory.mktemp("services")
    try:
        yield up(state, timeout=90)
    finally:
        down(state)


@pytest.fixture(scope="module")
def mlflow_stack(services_session: ServicesInfo) -> Iterator[ServicesInfo]:
    """The shared servers with their client variables in os.environ for one module (the MLflow client
    reads the S3 credentials from there); the environment is restored after the module."""
    saved = dict(os.environ)
    try:
        os.environ.update(services_session.env())
        yield services_session
    finally:
        os.environ.clear()
        os.environ.update(saved)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules holding a `slow` test run first (the order is otherwise kept): under `-n 2` the longest
    ones then start at once instead of finishing the run alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`pytest -n N` (xdist's default `--dist load`) sends whole modules to a worker, in the order above.

    Module-scoped fixtures (the pipeline run, the 2-rank runs, model servers) then run once, not once per
    worker that got a share of the module. Any other `--dist` is left as asked.
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # keep the slow-first order instead of most-tests-first
    return LoadFileScheduling(config, log)
