"""MLflow tracking for training runs: a Trainer callback that logs every epoch's metrics.

One MLflow run per training run. Metric names are the engine's own keys (``test/s3/top1``,
``train/s1/kd``, ``test/ensemble/top1``, ...) with the epoch as the step, so MLflow's charts show each
student and the ensemble side by side. Metrics go out in one ``log_batch`` per epoch: one request, not
one per value. Nothing here reads credentials: the MLflow client takes them from the environment.
"""

from __future__ import annotations

import time
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from bockd import __version__

_MLFLOW_PARAM_LIMIT = 100  # log_batch accepts at most 100 params per call


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


PIPELINE_RUN_TAG = "kfp.run_id"


def find_or_create_run(
    client: MlflowClient, experiment: str, pipeline_run_id: str, run_name: str | None = None
) -> str:
    """The MLflow run of one pipeline run: found by its ``kfp.run_id`` tag, created on first use.

    Every step of a pipeline run (and a retried step) logs into this one run.
    """
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'", max_results=1
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={PIPELINE_RUN_TAG: pipeline_run_id})
    return run.info.run_id


class MlflowCallback:
    """Logs the config as params, each epoch's metrics, and the final summary to one MLflow run.

    Pass ``run_id`` to log into an existing run (a pipeline creates the run and shares it between
    steps); otherwise a run named ``run_name`` is created in ``experiment`` when training starts.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str = "bockd",
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self.run_id = run_id
        self.run_name = run_name
        self.tags = dict(tags or {})

    def _ensure_run(self) -> str:
        if self.run_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        return self.run_id

    def on_train_start(self, trainer: Any) -> None:
        run_id = self._ensure_run()
        params = flatten(trainer.config.to_dict())
        tags = {
            "bockd.version": __version__,
            "bockd.mode": trainer.config.mode,
            "bockd.dataset": trainer.dataset.name,
            "bockd.dataset_sha256": trainer.dataset_sha256,
            **self.tags,
        }
        # A resumed run logs the same params again; MLflow accepts identical values, and refuses changed
        # ones, which the checkpoint's identity check has already ruled out.
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _MLFLOW_PARAM_LIMIT):
            self.client.log_batch(run_id, params=items[i : i + _MLFLOW_PARAM_LIMIT])
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        run_id = self._ensure_run()
        step = int(metrics["epoch"])
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if key != "epoch"]
        self.client.log_batch(run_id, metrics=batch)

    def on_train_end(self, trainer: Any, result: Any) -> None:
        run_id = self._ensure_run()
        self.client.log_dict(run_id, result.summary(), "summary.json")
