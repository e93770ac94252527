"""What the launcher hands every rank of a TrainJob through S3, and where in S3 a run's files live.

Under ``<staging_uri>/<pipeline run id>/ensemble/``: ``dataset/`` (the prepared Dataset folder),
``request.json`` (a `TrainRequest`), and what rank 0 writes back: ``model/`` (the Model folder) and
``result.json`` (written last: its presence says the model folder is whole).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bockd.errors import ConfigError

REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
MODEL_PREFIX = "model"
DATASET_PREFIX = "dataset"


@dataclass(frozen=True)
class TrainRequest:
    """What every rank reads: the training config and where the data, outputs and trackers are."""

    train_config: dict[str, Any]
    data_uri: str  # s3:// prefix of the prepared Dataset folder
    output_uri: str  # s3:// prefix: rank 0 writes model/ and result.json there
    tracking_uri: str = ""
    experiment: str = "bockd"
    pipeline_run_id: str = ""
    checkpoint_uri: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"train request: unknown keys {unknown}; expected {sorted(names)}")
        return cls(**raw)


def staging_prefix(staging_uri: str, pipeline_run_id: str) -> str:
    if not staging_uri.startswith("s3://"):
        raise ConfigError(f"staging_uri: expected an s3:// prefix, got {staging_uri!r}")
    return f"{staging_uri.rstrip('/')}/{pipeline_run_id or 'local'}/ensemble"
