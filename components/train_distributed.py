"""train_distributed: the BOC-KD ensemble on several GPU nodes, as a Kubeflow Trainer TrainJob.

Same inputs and outputs as train_ensemble, plus where and how wide to run. This step's own pod only
launches and watches the TrainJob (bockd.platform.trainjob): it needs no GPU, and a ServiceAccount
allowed to create, get and delete trainjobs.trainer.kubeflow.org in ``namespace``.
"""

from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output, OutputPath


def train_distributed(
    train_config: dict[str, Any],
    dataset: Input[Dataset],
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    checkpoint_uri: str,
    pipeline_run_id: str,
    staging_uri: str,
    trainer_image: str,
    node_selector: dict[str, str],
    tolerations: list[dict[str, str]],
    model: Output[Model],
    metrics: Output[Metrics],
    mlflow_run_id: OutputPath(str),
    num_nodes: int = 2,
    gpus_per_node: int = 1,
    namespace: str = "",
    cpu_request: str = "8",
    memory_request: str = "32Gi",
    shm_size: str = "8Gi",
    s3_secret: str = "bockd-s3",
    mlflow_secret: str = "bockd-mlflow",
    timeout_s: float = 172800.0,
    poll_s: float = 30.0,
) -> list[int]:
    """Weights, model card, history and ``students/s<k>`` exports (rank 0's); metrics go to MLflow.

    ``staging_uri``: an s3:// prefix for the dataset copy, the request and rank 0's outputs (under
    ``<pipeline_run_id>/ensemble/``). ``namespace`` empty: this pod's namespace. ``mlflow_secret`` empty:
    none. Returns the student numbers (the evaluate loop runs over them).
    """
    from bockd.pipeline.records import TrainingResult
    from bockd.pipeline.steps import checkpoint_prefix, publish_ensemble
    from bockd.platform.trainjob import train_distributed as run

    # A retried step finds the TrainJob of its first attempt; a failed one resumes from this checkpoint.
    ckpt = checkpoint_prefix(checkpoint_uri, pipeline_run_id, "ensemble")
    out = run(
        train_config,
        dataset.path,
        model.path,
        staging_uri=staging_uri,
        image=trainer_image,
        namespace=namespace,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        tracking_uri=mlflow_tracking_uri,
        experiment=mlflow_experiment,
        pipeline_run_id=pipeline_run_id,
        checkpoint_uri=ckpt,
        tags={"kfp.run_id": pipeline_run_id},
        timeout_s=timeout_s,
        poll_s=poll_s,
        node_selector=node_selector,
        tolerations=tuple(tolerations),
        cpu_request=cpu_request,
        memory_request=memory_request,
        shm_size=shm_size,
        s3_secret=s3_secret or None,
        mlflow_secret=mlflow_secret or None,
    )
    return publish_ensemble(TrainingResult.model_validate(out), model, metrics, mlflow_run_id)
