"""Bad pipeline parameters fail before any task runs, with the field named."""

from __future__ import annotations

import argparse
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
    # int8 and measurement options are stored complete, defaults filled in.
    assert p.quantization == {
        "enabled": True, "max_drop": 1.0, "calibration_images": 512, "per_channel": True,
        "reduce_range": False,
    }  # fmt: skip
    assert p.measurement["batch_sizes"] == [1, 32] and p.measurement["requests"] == 30
    q = build(train_config=smoke(), mlflow_tracking_uri=MLFLOW, quantization={"max_drop": 0.5})
    assert q.quantization["max_drop"] == 0.5 and q.quantization["calibration_images"] == 512


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
        ({"train_config": smoke(), "quantization": {"max_drop": -1}}, r"quantization:\n  max_drop"),
        ({"train_config": smoke(), "quantization": {"bits": 4}}, r"quantization:\n  bits: unknown key"),
        ({"train_config": smoke(), "measurement": {"batch_sizes": [32]}}, r"batch_sizes: must include 1"),
        ({"train_config": smoke(), "measurement": {"requests": 5}}, r"measurement:\n  requests"),
        (
            {"train_config": smoke(), "cascade": {"students": [1]}},
            r"cascade:\n  students: expected at least 2",
        ),
        (
            {"train_config": smoke(), "cascade": {"students": [3, 3]}},
            r"cascade:\n  students: expected at least",
        ),
        (
            {"train_config": smoke(), "cascade": {"students": [0, 1]}},
            r"cascade:\n  students: expected at least",
        ),
        (
            {"train_config": smoke(num_students=3), "cascade": {"students": [4, 1]}},
            r"cascade.students: \[4\]",
        ),
        ({"train_config": smoke(), "cascade": {"max_drop": -1}}, r"cascade:\n  max_drop"),
        ({"train_config": smoke(), "cascade": {"target_top1": 101}}, r"cascade:\n  target_top1"),
        ({"train_config": smoke(), "cascade": {"max_drop": 1, "target_top1": 90}}, r"not both"),
        ({"train_config": smoke(), "cascade": {"order": "up"}}, r"cascade:\n  order: unknown key"),
        (
            {"train_config": smoke(), "deploy_options": {"cascade": "yes"}},
            r"deploy_options.cascade: expected",
        ),
    ],
)
def test_bad_parameters_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build(mlflow_tracking_uri=MLFLOW, **values)


def test_the_cascade_is_stored_complete_and_checked_against_the_run() -> None:
    def with_val(**values: object) -> RunParameters:
        config = {"preset": "smoke", "data": {"val_fraction": 0.1}}
        return build(train_config=config, mlflow_tracking_uri=MLFLOW, **values)

    assert with_val().cascade == {"enabled": True, "students": [], "max_drop": 0.5}
    assert with_val(cascade={"students": [1, 5, 3]}).cascade["students"] == [5, 3, 1]  # smallest first
    # target_top1 replaces max_drop, so the stored parameter validates again.
    stored = with_val(cascade={"target_top1": 95}).cascade
    assert stored == {"enabled": True, "students": [], "target_top1": 95.0}
    assert with_val(cascade=stored).cascade == stored
    assert with_val().fits_cascade and not with_val(cascade={"enabled": False}).fits_cascade
    assert with_val(deploy_options={"cascade": True}).deploy_options == {"cascade": True}
    no_val = build(train_config=smoke(), mlflow_tracking_uri=MLFLOW)
    assert no_val.train_config["data"]["val_fraction"] == 0 and not no_val.fits_cascade
    with pytest.raises(
        ConfigError, match=r"deploy_options.cascade: no cascade will be fitted .*val_fraction"
    ):
        build(train_config=smoke(), deploy_options={"cascade": True})
    with pytest.raises(ConfigError, match=r"deploy_options\.backend: a cascade serves ONNX only"):
        with_val(deploy_options={"cascade": True, "backend": "torch"})


def test_pipeline_commands_hold_out_a_validation_split_unless_told_otherwise(tmp_path: Path) -> None:
    """The cascade needs a validation split: `bockd pipeline` holds out 10 % by default, and a --set or a
    config file that states data.val_fraction (0 included) wins."""
    from bockd.pipeline.cli import _train_config
    from bockd.pipeline.pipeline import DEFAULT_TRAIN_CONFIG

    def args(**kw: object) -> argparse.Namespace:
        base = {"set": None, "arch": None, "num_students": None, "dataset": None, "data_path": None,
                "epochs": None, "config": None, "preset": "smoke"}  # fmt: skip
        return argparse.Namespace(**{**base, **kw})

    assert DEFAULT_TRAIN_CONFIG["data"]["val_fraction"] == 0.1
    assert _train_config(args())["data"]["val_fraction"] == 0.1
    assert _train_config(args(set=["data.val_fraction=0"]))["data"]["val_fraction"] == 0
    assert _train_config(args(set=["data.val_fraction=0.25"]))["data"]["val_fraction"] == 0.25
    config = tmp_path / "c.yaml"
    config.write_text("preset: smoke\nepochs: 3\n")
    assert _train_config(args(config=str(config)))["data"]["val_fraction"] == 0.1
    config.write_text("preset: smoke\ndata: {val_fraction: 0.0}\n")
    resolved = _train_config(args(config=str(config)))
    assert resolved["data"]["val_fraction"] == 0 and resolved["epochs"] == 30


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
        (["--cascade", "{students: [9, 1]}"], "cascade.students"),
        (["--cascade", "[5, 1]"], "--cascade"),
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
