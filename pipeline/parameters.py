"""The pipeline's run parameters, validated before anything is submitted or run.

Bad parameters (an unknown architecture, fewer than two students, a baseline that does not exist, a
policy with unknown keys, an S3 bucket that does not exist) fail here with the field named, so no task
ever starts on them.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bockd.config import format_validation_errors
from bockd.errors import BockdError, ConfigError
from bockd.pipeline.options import (
    DEFAULT_CASCADE,
    DEFAULT_MEASUREMENT,
    DEFAULT_QUANTIZATION,
    CascadeOptions,
    MeasurementOptions,
    QuantizationOptions,
)
from bockd.pipeline.selection import Policy
from bockd.platform.s3 import check_bucket, endpoint_from_env, is_s3_uri

log = logging.getLogger("bockd.pipeline")

CLUSTER_MLFLOW_URI = "http://mlflow.bockd.svc.cluster.local:5000"  # the MLflow Service in manifests/


def _check_deploy_options(options: dict[str, Any]) -> None:
    """Unknown keys or values an InferenceService would refuse fail here, not in the deploy step."""
    from bockd.pipeline.steps import check_deploy_option_keys, deploy_spec_options
    from bockd.platform.inference_service import DeploySpec

    check_deploy_option_keys(options)
    spec = deploy_spec_options(options)
    if options.get("cascade") and spec.get("backend") == "torch":
        raise ConfigError("deploy_options.backend: a cascade serves ONNX only; use backend onnx with cascade")
    try:
        DeploySpec("check", "check", "s3://check/model", **spec)
    except (BockdError, TypeError, ValueError) as err:
        raise ConfigError(f"deploy_options: {err}") from None
    for key in ("timeout_s", "poll_s"):
        seconds = options.get(key, 1)
        if not isinstance(seconds, int | float) or seconds <= 0:
            raise ConfigError(f"deploy_options.{key}: expected seconds > 0, got {seconds!r}")


def fits_cascade(options: CascadeOptions, train_config: dict[str, Any]) -> bool:
    """Whether a run of ``train_config`` (a full config dict) fits a cascade with ``options``."""
    return options.enabled and float(train_config.get("data", {}).get("val_fraction") or 0) > 0


class RunParameters(BaseModel):
    """Exactly the pipeline function's parameters (see pipeline.py), each checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_config: dict[str, Any]
    baseline_students: list[int] = Field(default_factory=list)
    selection_policy: dict[str, Any] = Field(default_factory=dict)
    model_prefix: str = Field("bockd", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    mlflow_tracking_uri: str = Field(CLUSTER_MLFLOW_URI, pattern=r"^https?://\S+$")
    mlflow_experiment: str = Field("bockd", min_length=1)
    checkpoint_uri: str = ""
    eval_device: str = "cpu"
    deploy_mode: Literal["none", "local", "cluster"] = "none"
    local_serving_dir: str = ""
    serving_namespace: str = Field("", pattern=r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$")
    deploy_options: dict[str, Any] = Field(default_factory=dict)
    mlflow_artifacts_destination: str = Field("s3://bockd/mlflow", pattern=r"^s3://[^/\s]+(/\S*)?$")
    quantization: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_QUANTIZATION))
    measurement: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_MEASUREMENT))
    cascade: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_CASCADE))

    @classmethod
    def build(cls, **values: Any) -> RunParameters:
        """Validate every field and the cross-field rules; errors are ConfigError naming the field."""
        from bockd.pipeline.pipeline import config_parameter

        try:
            params = cls.model_validate(values)
        except ValidationError as err:
            raise ConfigError(
                format_validation_errors(err).replace("invalid config:", "invalid pipeline parameters:", 1)
            ) from None
        try:
            config = config_parameter(params.train_config)
        except ConfigError as err:
            raise ConfigError(f"train_config: {err}") from None
        n = config["model"]["num_students"]
        if not params.baseline_students:
            # kfp.local cannot collect the outputs of a loop that ran zero times, so the pipeline needs
            # at least one baseline; the smallest student's is the cheapest (and the most telling).
            raise ConfigError(
                f"baseline_students: give at least one student (1..{n}); e.g. [{n}] trains only the "
                "smallest student alone, the cheapest baseline"
            )
        bad = [s for s in params.baseline_students if not 1 <= s <= n]
        if bad or len(set(params.baseline_students)) != len(params.baseline_students):
            raise ConfigError(
                f"baseline_students: expected distinct student numbers in 1..{n}, "
                f"got {params.baseline_students}"
            )
        Policy.from_mapping(params.selection_policy)
        # Stored complete (every default filled in): what a run used stays readable in its parameters.
        quantization = QuantizationOptions.from_mapping(params.quantization).model_dump()
        measurement = MeasurementOptions.from_mapping(params.measurement).model_dump()
        cascade = CascadeOptions.from_mapping(params.cascade)
        cascade.students_of(n)
        if params.deploy_options.get("cascade") is True and not fits_cascade(cascade, config):
            raise ConfigError(
                "deploy_options.cascade: no cascade will be fitted to deploy: it needs cascade.enabled and "
                "a validation split (train_config.data.val_fraction > 0)"
            )
        if params.checkpoint_uri and not is_s3_uri(params.checkpoint_uri):
            raise ConfigError(f"checkpoint_uri: expected s3://bucket/prefix, got {params.checkpoint_uri!r}")
        if params.deploy_mode == "local" and not params.local_serving_dir:
            raise ConfigError("local_serving_dir: deploy_mode 'local' needs a folder for the servers' state")
        _check_deploy_options(params.deploy_options)
        if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", params.eval_device):
            raise ConfigError(f"eval_device: expected cpu, cuda, cuda:N or auto, got {params.eval_device!r}")
        return params.model_copy(
            update={
                "train_config": config,
                "quantization": quantization,
                "measurement": measurement,
                "cascade": cascade.stored(),
            }
        )

    @property
    def fits_cascade(self) -> bool:
        """Whether the cascade step will fit a cascade (enabled, and the data hold out a validation split)."""
        return fits_cascade(CascadeOptions.from_mapping(self.cascade), self.train_config)

    def s3_uris(self) -> dict[str, str]:
        """Every S3 location this run reads or writes, by the parameter that names it."""
        uris = {}
        path = self.train_config.get("data", {}).get("path")
        if is_s3_uri(path):
            uris["train_config.data.path"] = path
        if self.checkpoint_uri:
            uris["checkpoint_uri"] = self.checkpoint_uri
        return uris

    def check_buckets(self, required: bool = True) -> None:
        """Fail unless every bucket the run uses exists. Needs S3 access from here (the environment);
        without an endpoint configured, ``required=False`` skips the check with a warning."""
        uris = self.s3_uris()
        if not uris:
            return
        if not endpoint_from_env() and not required:
            log.warning("no S3 endpoint in the environment: not checking the buckets of %s", ", ".join(uris))
            return
        for field, uri in uris.items():
            check_bucket(uri, field)

    def arguments(self) -> dict[str, Any]:
        return self.model_dump()
