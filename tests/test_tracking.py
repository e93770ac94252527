"""MLflow tracking of a real training run against a real MLflow server (the embedded local stack)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from bockd.config import build_config
from bockd.data import ImageDataset
from bockd.engine import Trainer
from bockd.platform.services import ServicesInfo
from bockd.platform.tracking import MlflowCallback, flatten


def test_flatten_nested_config() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {
        "a.b": "1",
        "a.c.d": "None",
        "e": "[1, 2]",
    }


def test_every_epoch_of_every_student_reaches_mlflow(
    mlflow_stack: ServicesInfo, digits: ImageDataset, tmp_path: Path
) -> None:
    config = build_config(
        "smoke", {"epochs": 2, "batch_size": 64, "model": {"num_students": 3}, "runtime": {"progress": "off"}}
    )
    callback = MlflowCallback(
        mlflow_stack.mlflow_uri, experiment="tracking-test", run_name="tiny", tags={"kfp.run_id": "r1"}
    )
    few = digits.with_train_subset(128, seed=0)  # what is logged does not depend on how much is trained
    result = Trainer(config, few, tmp_path, callbacks=[callback]).fit()

    client = MlflowClient(mlflow_stack.mlflow_uri)
    run = client.get_run(callback.run_id)
    assert run.info.run_name == "tiny"
    assert run.data.params["model.num_students"] == "3" and run.data.params["optim.lr"] == "0.1"
    assert run.data.tags["bockd.dataset_sha256"] == few.sha256()
    assert run.data.tags["kfp.run_id"] == "r1"
    for key in ("test/s1/top1", "test/s3/top1", "test/ensemble/top1", "train/s2/kd", "train/s2/hint", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2], key
    final = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test/ensemble/top1")}
    assert final[2] == pytest.approx(result.final["test/ensemble/top1"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "summary.json" in artifacts


def test_cli_train_logs_to_mlflow(mlflow_stack: ServicesInfo, tmp_path: Path) -> None:
    from bockd.cli import main

    workdir = tmp_path / "cli-run"
    args = [
        "train",
        "--preset",
        "smoke",
        "--epochs",
        "1",
        "--set",
        "model.num_students=2",
        "--set",
        "data.train_subset=128",
        "--progress",
        "off",
    ]
    assert (
        main(
            [*args, "--workdir", str(workdir), "--mlflow-uri", mlflow_stack.mlflow_uri, "--experiment", "cli"]
        )
        == 0
    )
    client = MlflowClient(mlflow_stack.mlflow_uri)
    experiment = client.get_experiment_by_name("cli")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["cli-run"]
    assert "test/s2/top1" in runs[0].data.metrics
