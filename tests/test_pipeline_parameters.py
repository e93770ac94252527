"""Bad pipeline parameters fail before any task runs, with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from bockd.cli import main
from bockd.errors import BockdError, ConfigError
from bockd.pipeline.parameters import RunParameters

MLFLOW = "http://127.0.0.1:5000"


def smoke(**model: object) -> dict:
    return {"preset": "smoke", "model": dict(model)}


def build(**values: object) -> RunParameters:
    return RunParameters.build(**{"baseline_students": [1], **values})


def test_valid_parameters_resolve_the_full_config() -> None:
    p = RunParameters.build(
        train_config=smoke(num_students=3), baseline_students=[1, 3], mlflow_tracking_uri=MLFLOW
    )
    assert p.train_config["model"]["num_students"] == 3
    assert p.train_config["epochs"] == 30  # the smoke preset, filled in
    assert "path" not in p.train_config["data"]  # nulls dropped: KFP parameters cannot hold them
    assert p.arguments()["baseline_students"] == [1, 3]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"train_config": smoke(arch="resnet21")}, "model.arch"),
        ({"train_config": smoke(num_students=1)}, "model.num_students"),
        ({"train_config": {"preset": "nope"}}, "preset"),
        ({"train_config": smoke(), "baseline_students": [0]}, "baseline_students"),
        ({"train_config": smoke(), "baseline_students": []}, "at least one student"),
        ({"train_config": smoke(num_students=3), "baseline_students": [4]}, "baseline_students"),
        ({"train_config": smoke(), "baseline_students": [2, 2]}, "baseline_students"),
        ({"train_config": smoke(), "selection_policy": {"best": True}}, "best"),
        ({"train_config": smoke(), "selection_policy": {"min_top1": 101}}, "min_top1"),
        ({"train_config": smoke(), "checkpoint_uri": "/tmp/ckpt"}, "checkpoint_uri"),
        ({"train_config": smoke(), "deploy_mode": "kubernetes"}, "deploy_mode"),
        ({"train_config": smoke(), "deploy_options": {"replicas": 2}}, "deploy_options"),
        ({"train_config": smoke(), "deploy_options": {"deployment_mode": "Fast"}}, "deployment_mode"),
        ({"train_config": smoke(), "deploy_mode": "local"}, "local_serving_dir"),
        ({"train_config": smoke(), "model_prefix": "bad prefix"}, "model_prefix"),
        ({"train_config": smoke(), "eval_device": "tpu"}, "eval_device"),
        ({"train_config": smoke(), "unknown": 1}, "unknown"),
    ],
)
def test_bad_parameters_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build(mlflow_tracking_uri=MLFLOW, **values)


def test_mlflow_uri_defaults_to_the_cluster_service_and_must_be_http() -> None:
    assert build(train_config=smoke()).mlflow_tracking_uri.startswith("http://mlflow.")
    with pytest.raises(ConfigError, match="mlflow_tracking_uri"):
        build(train_config=smoke(), mlflow_tracking_uri="mlflow:5000")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "resnet21"], "model.arch"),
        (["--num-students", "1"], "model.num_students"),
        (["--baselines", "1,9"], "baseline_students"),
        (["--baselines", "one"], "--baselines"),
        (["--policy", "{fastest: true}"], "fastest"),
        (["--policy", "[1, 2]"], "--policy"),
    ],
)
def test_local_run_rejects_bad_parameters_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    state = tmp_path / "state"
    code = main(["pipeline", "run", "--local", "--state-dir", str(state), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not state.exists()  # no service started, no run folder written


def test_schedule_rejects_a_malformed_cron_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on 127.0.0.1: had a request been sent, the error would be a connection error.
    code = main(["pipeline", "schedule", "--host", "http://127.0.0.1:9", "--cron", "0 0 25 * * *"])
    assert code == 2
    assert "cron" in capsys.readouterr().err


def test_missing_bucket_is_rejected(mlflow_stack: object, tmp_path: Path) -> None:
    """Against the real local S3 server: a data source or checkpoint bucket that does not exist."""
    config = {**smoke(), "data": {"dataset": "cifar10", "path": "s3://no-such-bucket/cifar10"}}
    params = build(train_config=config, mlflow_tracking_uri=MLFLOW)
    with pytest.raises(
        BockdError, match=r"train_config\.data\.path: the S3 bucket 'no-such-bucket' does not exist"
    ):
        params.check_buckets()
    params = build(train_config=smoke(), mlflow_tracking_uri=MLFLOW, checkpoint_uri="s3://missing-ckpt/x")
    with pytest.raises(BockdError, match="checkpoint_uri: the S3 bucket 'missing-ckpt'"):
        params.check_buckets()
    ok = build(train_config=smoke(), mlflow_tracking_uri=MLFLOW, checkpoint_uri="s3://bockd/ckpt")
    ok.check_buckets()
