"""The bockd pipeline: data -> ensemble (+ baselines) -> evaluate + quantize -> measure -> cascade -> register
-> select -> report -> deploy.

:func:`build_pipeline` makes the ``@dsl.pipeline`` for a :class:`PipelineSettings`: the compile-time,
cluster-side choices (images, GPU node, secrets, retries). Everything a run varies (the training config,
baselines, int8 quantization, latency measurement, the cascade, selection policy, MLflow target, deploy
mode) is a pipeline parameter.
"""

from dataclasses import replace
from typing import Any, NamedTuple

from kfp import dsl, kubernetes

from bockd.components import make_components
from bockd.config import build_config
from bockd.pipeline.options import (
    DEFAULT_CASCADE,
    DEFAULT_MEASUREMENT,
    DEFAULT_QUANTIZATION,
    DEFAULT_VAL_FRACTION,
)
from bockd.pipeline.parameters import CLUSTER_MLFLOW_URI
from bockd.pipeline.settings import PIPELINE_NAME, GpuNode, PipelineSettings
from bockd.platform.credentials import MLFLOW_SECRET_KEYS, S3_SECRET_KEYS


def config_parameter(raw: dict[str, Any]) -> dict[str, Any]:
    """A training config as a pipeline parameter: validated, nulls dropped (KFP parameters cannot hold
    null; the defaults they stand for come back when a step validates the dict again)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if v is not None}
        return list(node) if isinstance(node, tuple) else node

    return strip(build_config(None, raw).to_dict())


# The cascade's thresholds are fitted on a validation split that training never sees: hold one out.
DEFAULT_TRAIN_CONFIG = config_parameter(
    {"preset": "smoke", "runtime": {"progress": "log"}, "data": {"val_fraction": DEFAULT_VAL_FRACTION}}
)


class PipelineOutputs(NamedTuple):
    dataset: dsl.Dataset
    report: dsl.HTML  # the HTML report the KFP UI renders
    summary: dsl.Artifact  # per-student rows as JSON
    endpoints: dsl.Artifact  # deployed students (and the cascade) as JSON
    cascade: dsl.Model  # the cascade folder (cascade/) and its record, or the record of why it was skipped


def _with_secrets(task: dsl.PipelineTask, settings: PipelineSettings) -> dsl.PipelineTask:
    if settings.s3_endpoint:
        task.set_env_variable("BOCKD_S3_ENDPOINT", settings.s3_endpoint)
    if settings.s3_secret:
        kubernetes.use_secret_as_env(task, settings.s3_secret, {k: k for k in S3_SECRET_KEYS})
    if settings.mlflow_secret:
        kubernetes.use_secret_as_env(
            task, settings.mlflow_secret, {k: k for k in MLFLOW_SECRET_KEYS}, optional=True
        )
    return task


def _on_gpu_node(task: dsl.PipelineTask, gpu: GpuNode | None) -> dsl.PipelineTask:
    if gpu is None:
        return task
    task.set_accelerator_type(gpu.accelerator).set_accelerator_limit(gpu.count)
    task.set_cpu_request(gpu.cpu_request).set_memory_request(gpu.memory_request)
    if gpu.toleration:
        kubernetes.add_toleration(task, key=gpu.toleration, operator="Exists", effect="NoSchedule")
    for key, value in gpu.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    if gpu.shm_size:
        kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=gpu.shm_size)
    return task


def _on_measure_node(task: dsl.PipelineTask, settings: PipelineSettings) -> dsl.PipelineTask:
    node = settings.measure
    if node.cpu:
        task.set_cpu_request(node.cpu).set_cpu_limit(node.cpu)
        task.set_memory_request(node.memory).set_memory_limit(node.memory)
    for key, value in node.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    return task


def _trainjob_args(settings: PipelineSettings) -> dict[str, Any]:
    """The launcher's arguments: the TrainJob it creates carries the GPU node settings, not its own pod."""
    gpu = settings.gpu
    assert gpu is not None
    tolerations = (
        [{"key": gpu.toleration, "operator": "Exists", "effect": "NoSchedule"}] if gpu.toleration else []
    )
    return {
        "staging_uri": settings.staging_uri,
        "trainer_image": settings.trainer_image,
        "node_selector": dict(gpu.node_selector),
        "tolerations": tolerations,
        "num_nodes": settings.num_nodes,
        "gpus_per_node": gpu.count,
        "cpu_request": gpu.cpu_request,
        "memory_request": gpu.memory_request,
        "shm_size": gpu.shm_size,
        "s3_secret": settings.s3_secret or "",
        "mlflow_secret": settings.mlflow_secret or "",
    }


def _retried(task: dsl.PipelineTask, settings: PipelineSettings) -> dsl.PipelineTask:
    # Registry and serving calls cross the network: transient failures are retried with backoff.
    return task.set_retry(settings.retries, backoff_duration="30s", backoff_factor=2.0)


def build_pipeline(settings: PipelineSettings | None = None) -> Any:
    """The pipeline function (a KFP GraphComponent) for ``settings``."""
    settings = settings or PipelineSettings()
    c = make_components(settings.trainer_image)

    @dsl.pipeline(name=PIPELINE_NAME, description="BOC-KD: one training run, a family of compressed students")
    def bockd_pipeline(
        train_config: dict[str, Any] = DEFAULT_TRAIN_CONFIG,
        # Typed items: a bare list compiles every loop item as STRING, and the KFP driver then refuses it
        # for an int input (kubeflow/pipelines 2.17.0 backend/src/v2/driver/resolve.go lines 203-233, 298).
        baseline_students: list[int] = [],  # noqa: B006 (KFP reads the default from the signature)
        selection_policy: dict[str, Any] = {},  # noqa: B006
        model_prefix: str = "bockd",
        mlflow_tracking_uri: str = CLUSTER_MLFLOW_URI,
        mlflow_experiment: str = "bockd",
        checkpoint_uri: str = "",
        eval_device: str = "cpu",
        deploy_mode: str = "none",
        local_serving_dir: str = "",
        serving_namespace: str = "",
        deploy_options: dict[str, Any] = {},  # noqa: B006
        mlflow_artifacts_destination: str = "s3://bockd/mlflow",
        quantization: dict[str, Any] = DEFAULT_QUANTIZATION,
        measurement: dict[str, Any] = DEFAULT_MEASUREMENT,
        cascade: dict[str, Any] = DEFAULT_CASCADE,
    ) -> PipelineOutputs:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        data = _with_secrets(c.prepare_data(train_config=train_config), settings)
        data.set_caching_options(False)  # the source may change under the same name
        data.set_display_name("prepare data")

        training = {
            "train_config": train_config,
            "dataset": data.outputs["dataset"],
            "mlflow_tracking_uri": mlflow_tracking_uri,
            "mlflow_experiment": mlflow_experiment,
            "checkpoint_uri": checkpoint_uri,
            "pipeline_run_id": run_id,
        }
        if settings.distributed:
            ensemble = _with_secrets(c.train_distributed(**training, **_trainjob_args(settings)), settings)
        else:
            ensemble = _on_gpu_node(_with_secrets(c.train_ensemble(**training), settings), settings.gpu)
        ensemble.set_caching_options(False).set_display_name("train ensemble")

        with dsl.ParallelFor(baseline_students, parallelism=1 if settings.gpu is None else 0) as k:
            baseline = c.train_baseline(
                train_config=train_config,
                student=k,
                dataset=data.outputs["dataset"],
                checkpoint_uri=checkpoint_uri,
                pipeline_run_id=run_id,
            )
            # One student alone never needs more than one GPU (and baselines are not distributed).
            _on_gpu_node(_with_secrets(baseline, settings), settings.gpu and replace(settings.gpu, count=1))
            baseline.set_caching_options(False).set_display_name("train baseline")

        # A dsl.Collected may feed only one task: each consumer gets its own.
        def baselines() -> dsl.Collected:
            return dsl.Collected(baseline.outputs["model"])

        with dsl.ParallelFor(ensemble.outputs["Output"], parallelism=1 if settings.gpu is None else 0) as s:
            ev = c.evaluate(
                student=s,
                dataset=data.outputs["dataset"],
                model=ensemble.outputs["model"],
                device=eval_device,
            )
            ev.set_display_name("evaluate student")
            quant = c.quantize(
                student=s,
                dataset=data.outputs["dataset"],
                model=ensemble.outputs["model"],
                evaluation=ev.outputs["evaluation"],
                quantization=quantization,
            )
            quant.set_display_name("quantize student (int8)")

        def evaluations() -> dsl.Collected:
            return dsl.Collected(ev.outputs["evaluation"])

        def quantized() -> dsl.Collected:
            return dsl.Collected(quant.outputs["quantized"])

        # Timings belong to the machine that took them: never reused from another run's cache.
        meas = c.measure(
            dataset=data.outputs["dataset"],
            model=ensemble.outputs["model"],
            quantized=quantized(),
            measurement=measurement,
            mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_run_id=ensemble.outputs["mlflow_run_id"],
        )
        _with_secrets(meas, settings).set_caching_options(False).set_display_name("measure served latency")
        _on_measure_node(meas, settings)

        # After measure: its stage costs are the measured forwards and its int8 choice the measured verdicts.
        casc = c.cascade(
            dataset=data.outputs["dataset"],
            model=ensemble.outputs["model"],
            quantized=quantized(),
            measurements=meas.outputs["measurements"],
            cascade_options=cascade,
            mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_run_id=ensemble.outputs["mlflow_run_id"],
        )
        # Without measurements it times the students itself: on the measure node, never from a cache.
        _with_secrets(casc, settings).set_caching_options(False).set_display_name("fit the cascade")
        _on_measure_node(casc, settings)

        reg = c.register(
            model=ensemble.outputs["model"],
            evaluations=evaluations(),
            baselines=baselines(),
            quantized=quantized(),
            measurements=meas.outputs["measurements"],
            cascade=casc.outputs["cascade"],
            mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_run_id=ensemble.outputs["mlflow_run_id"],
            model_prefix=model_prefix,
        )
        _retried(_with_secrets(reg, settings), settings).set_display_name("register in MLflow")

        sel = c.select(
            evaluations=evaluations(),
            baselines=baselines(),
            quantized=quantized(),
            measurements=meas.outputs["measurements"],
            registrations=reg.outputs["registrations"],
            selection_policy=selection_policy,
            mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_run_id=ensemble.outputs["mlflow_run_id"],
        )
        _retried(_with_secrets(sel, settings), settings).set_display_name("select students")

        rep = c.report(
            model=ensemble.outputs["model"],
            evaluations=evaluations(),
            baselines=baselines(),
            quantized=quantized(),
            measurements=meas.outputs["measurements"],
            registrations=reg.outputs["registrations"],
            selection=sel.outputs["selection"],
            cascade=casc.outputs["cascade"],
            mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_run_id=ensemble.outputs["mlflow_run_id"],
            pipeline_run_id=run_id,
        )
        _with_secrets(rep, settings).set_display_name("report")

        dep = c.deploy(
            model=ensemble.outputs["model"],
            quantized=quantized(),
            selection=sel.outputs["selection"],
            registrations=reg.outputs["registrations"],
            cascade=casc.outputs["cascade"],
            deploy_mode=deploy_mode,
            local_serving_dir=local_serving_dir,
            serving_namespace=serving_namespace,
            deploy_options=deploy_options,
            mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_artifacts_destination=mlflow_artifacts_destination,
        )
        _retried(_with_secrets(dep, settings), settings).set_display_name("deploy")

        return PipelineOutputs(
            dataset=data.outputs["dataset"],
            report=rep.outputs["report"],
            summary=rep.outputs["summary"],
            endpoints=dep.outputs["endpoints"],
            cascade=casc.outputs["cascade"],
        )

    return bockd_pipeline
