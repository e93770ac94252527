"""train_ensemble: the BOC-KD ensemble on a GPU node -> a Model artifact with every student exported."""

from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output, OutputPath


def train_ensemble(
    train_config: dict[str, Any],
    dataset: Input[Dataset],
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    checkpoint_uri: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
    mlflow_run_id: OutputPath(str),
) -> list[int]:
    """Weights, model card, history and ``students/s<k>`` exports; per-epoch metrics go to MLflow.

    Returns the student numbers (the evaluate loop runs over them).
    """
    from bockd.pipeline.steps import checkpoint_prefix, publish_ensemble
    from bockd.pipeline.steps import train_ensemble as run

    # A retried pod resumes from the checkpoint this pipeline run left in S3.
    ckpt = checkpoint_prefix(checkpoint_uri, pipeline_run_id, "ensemble")
    out = run(
        train_config,
        dataset.path,
        model.path,
        tracking_uri=mlflow_tracking_uri,
        experiment=mlflow_experiment,
        pipeline_run_id=pipeline_run_id,
        checkpoint_uri=ckpt,
        tags={"kfp.run_id": pipeline_run_id},
    )
    return publish_ensemble(out, model, metrics, mlflow_run_id)
