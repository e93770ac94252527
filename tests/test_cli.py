"""The ``bockd`` command line, called in-process through ``bockd.cli.main`` (and once as a subprocess)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bockd
import bockd.engine
import bockd.reproduce
from bockd.cli import main
from bockd.config import build_config
from bockd.export import load_student, student_from_run
from bockd.models import list_models, student_table

pytestmark = pytest.mark.usefixtures("single_thread")

# DESIGN.md section 1 (paper Table 1): 10 classes, 5 students.
PAPER_PARAMS = {
    "resnet20": [272474, 171536, 97018, 42231, 10773],
    "resnet32": [466906, 293560, 165442, 71555, 17745],
    "resnet44": [661338, 415584, 233866, 100879, 24717],
    "resnet110": [1730714, 1086716, 610198, 262161, 63063],
    "densenet_bc_100_12": [769162, 446170, 279482, 102410, 33002],
}


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any training or data loading fails the test: bad input must be refused before compute starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training or data loading started")

    monkeypatch.setattr(bockd.engine, "train", forbidden)
    monkeypatch.setattr(bockd.engine, "load_training_data", forbidden)
    monkeypatch.setattr(bockd.reproduce, "load_training_data", forbidden)
    monkeypatch.setattr(bockd.reproduce, "Trainer", forbidden)


def test_version_runs_as_a_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bockd", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"bockd {bockd.__version__}"
    assert bockd.__version__ == importlib.metadata.version("bockd")


# -- models -------------------------------------------------------------------------------------------------


def test_models_json_lists_every_architecture_with_the_paper_counts(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert list(rows) == list_models()
    assert set(PAPER_PARAMS) <= set(rows)
    for name, table in rows.items():
        assert [r["student"] for r in table] == ["S1", "S2", "S3", "S4", "S5"], name
        assert table[0]["size_pct"] == 100.0
        params = [r["params"] for r in table]
        assert params == sorted(params, reverse=True) and params[-1] > 0, name
    for name, params in PAPER_PARAMS.items():
        assert [r["params"] for r in rows[name]] == params, name
    assert [r["size_pct"] for r in rows["resnet20"]] == [100.0, 62.95, 35.61, 15.5, 3.95]


def test_models_json_follows_num_students_and_num_classes(capsys) -> None:
    assert main(["models", "--json", "--num-students", "3", "--num-classes", "100"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert list(rows) == list_models()
    for name, table in rows.items():
        assert [r["student"] for r in table] == ["S1", "S2", "S3"], name
        assert table == student_table(name, num_classes=100, in_channels=3, num_students=3), name
    # S1 is full width whatever N is: only the head grows, by 64 x 90 weights + 90 biases.
    assert rows["resnet20"][0]["params"] == 272474 + 64 * 90 + 90
    assert rows["resnet20"][1]["params"] != 171536


def test_models_table_prints_one_line_per_architecture(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0].split()
    assert header == ["architecture", "S1", "S2", "S3", "S4", "S5"]
    for name in list_models():
        assert sum(line.split()[0] == name for line in lines if line.strip()) == 1, name
    (resnet20,) = [line for line in lines if line.startswith("resnet20 ")]
    for count in ("272,474", "171,536", "97,018", "42,231", "10,773 (3.95%)"):
        assert count in resnet20
    assert "10 classes" in out and "5 students" in out


# -- train --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--set", "optim.lr=-1"], "optim.lr"),
        (["--set", "model.arch=nope"], "model.arch"),
        (["--set", "bogus=1"], "bogus"),
        (["--mode", "baseline", "--student", "9"], "student"),
        (["--epochs", "0"], "epochs"),
    ],
)
def test_train_refuses_a_bad_value_before_any_compute(
    args, field, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, no_compute
) -> None:
    monkeypatch.chdir(tmp_path)  # the default workdir (runs/train) must not appear either
    workdir = tmp_path / "run"
    rc = main(["train", "--preset", "smoke", "--workdir", str(workdir), "--progress", "off", *args])
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("bockd: error:")
    assert field in captured.err
    assert "Traceback" not in captured.err
    assert not workdir.exists()
    assert list(tmp_path.iterdir()) == []


def test_train_print_config_prints_the_resolved_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, no_compute
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--preset", "smoke", "--epochs", "3", "--set", "optim.lr=0.02", "--set", "model.num_students=3"]
    rc = main(["train", *args, "--mode", "baseline", "--student", "2", "--print-config"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    expected = build_config(
        "smoke",
        {"epochs": 3, "optim": {"lr": 0.02}, "model": {"num_students": 3}, "mode": "baseline", "student": 1},
    )
    assert printed == expected.to_dict()
    assert printed["preset"] == "smoke" and printed["epochs"] == 3 and printed["optim"]["lr"] == 0.02
    assert printed["student"] == 1  # --student is 1-based, the config 0-based
    assert printed["optim"]["momentum"] == 0.9  # the preset's values fill in the rest
    assert list(tmp_path.iterdir()) == []


def test_train_then_export_a_student(tmp_path: Path, capsys) -> None:
    run, out = tmp_path / "run", tmp_path / "s2"
    rc = main(
        [
            "train",
            "--preset",
            "smoke",
            "--epochs",
            "1",
            "--set",
            "model.num_students=3",
            "--set",
            "batch_size=128",
            "--set",
            "data.train_subset=128",  # one batch: what is checked is the command, not the learning
            "--progress",
            "off",
            "--workdir",
            str(run),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[: printed.index("\nweights")])
    assert summary["epochs"] == 1
    assert set(summary["students"]) == {"s1", "s2", "s3", "ensemble"}
    assert str(run) in printed
    for name in ("model.safetensors", "model.json", "history.json", "summary.json"):
        assert (run / name).is_file(), name

    assert main(["export", "--run", str(run), "--student", "2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "model.onnx"}
    config = json.loads((out / "config.json").read_text())
    assert config["student"] == "S2" and config["index"] == 1 and config["trained_as"] == "ensemble"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_student(out)(x), student_from_run(run, 1)[0](x))

    bad = tmp_path / "s9"
    assert main(["export", "--run", str(run), "--student", "9", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bockd: error: student:")
    assert "S9" in err and "S1..S3" in err
    assert not bad.exists()


def test_export_of_a_missing_run_is_a_clean_error(tmp_path: Path, capsys) -> None:
    rc = main(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("bockd: error:") and "model.json" in err
    assert not (tmp_path / "out").exists()


# -- reproduce ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", ["x", "0", "-2", ",", "0,x", "1.5"])
def test_reproduce_refuses_bad_seeds(seeds, tmp_path: Path, capsys, no_compute) -> None:
    out = tmp_path / "out"
    assert main(["reproduce", "--seeds", seeds, "--out", str(out), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bockd: error: --seeds")
    assert not out.exists()


def test_reproduce_refuses_a_bad_value_before_any_compute(tmp_path: Path, capsys, no_compute) -> None:
    out = tmp_path / "out"
    rc = main(["reproduce", "--seeds", "2", "--set", "optim.lr=-1", "--out", str(out), "--progress", "off"])
    assert rc == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not out.exists()


def test_services_status_of_an_empty_state_folder_reports_stopped(tmp_path: Path, capsys) -> None:
    rc = main(["services", "status", "--state-dir", str(tmp_path / "state")])
    out = capsys.readouterr().out
    assert rc == 3  # not running: scripts can test `bockd services status` directly
    assert "seaweedfs" in out and "mlflow" in out and "stopped" in out


def test_services_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path, capsys) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        rc = main(["services", "up", "--state-dir", str(tmp_path / "state"), "--s3-port", str(port)])
    assert rc == 2
    assert str(port) in capsys.readouterr().err
    assert not (tmp_path / "state" / "services.json").exists()


# -- pipeline run --local: checks before anything starts ----------------------------------------------------


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting the services or the pipeline fails the test: the pre-flight must refuse first."""
    import bockd.pipeline.local
    import bockd.platform.services

    def forbidden(*args, **kwargs):
        raise AssertionError("the services or the pipeline started")

    monkeypatch.setattr(bockd.platform.services, "up", forbidden)
    monkeypatch.setattr(bockd.pipeline.local, "run_local", forbidden)


def _files(folder: Path, *names: str) -> Path:
    """Empty files: the pre-flight looks for them and reads none."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.mark.parametrize(
    ("dataset", "make", "message"),
    [
        ("cifar10", lambda d: d / "nonexistent", r"cifar10 path '.*nonexistent' does not exist"),
        ("cifar10", lambda d: _files(d), r"holds none of: cifar-10-python\.tar\.gz"),
        ("cifar10", lambda d: _files(d, "data_batch_1", "test_batch"), r"data_batch_2' is missing"),
        ("cifar100", lambda d: _files(d, "cifar100_train.npz"), r"cifar100_test\.npz' is missing"),
        (
            "fashion-mnist",
            lambda d: _files(d, *FASHION_FILES[:3]),
            r"t10k-labels-idx1-ubyte'\[\.gz\] is missing",
        ),
        ("imagefolder", lambda d: _files(d, "train/cat/0.png"), r"found train/ but neither test/ nor val/"),
        ("imagefolder", lambda d: _files(d, "cat/notes.txt"), r"no images with extensions"),
        ("digits", lambda d: d, r"digits ships with scikit-learn and takes no path"),
    ],
)
def test_local_run_checks_the_data_source_before_anything_starts(
    dataset: str, make, message: str, tmp_path: Path, capsys, nothing_starts
) -> None:
    source = make(tmp_path / "data")
    state = tmp_path / "state"
    rc = main(
        [
            "pipeline",
            "run",
            "--local",
            "--state-dir",
            str(state),
            "--dataset",
            dataset,
            "--data-path",
            str(source),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not state.exists()  # no service, no run folder


@pytest.mark.parametrize(
    ("dataset", "names"),
    [("cifar10", CIFAR_BATCHES), ("fashion-mnist", FASHION_FILES), ("imagefolder", ("a/0.png", "b/1.png"))],
)
def test_local_run_preflight_accepts_a_complete_source(
    dataset: str, names: tuple[str, ...], tmp_path: Path, nothing_starts
) -> None:
    source = _files(tmp_path / "data", *names)
    with pytest.raises(AssertionError, match="started"):  # got as far as starting the services
        main(
            [
                "pipeline",
                "run",
                "--local",
                "--state-dir",
                str(tmp_path / "s"),
                "--dataset",
                dataset,
                "--data-path",
                str(source),
            ]
        )
