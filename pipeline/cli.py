"""``bockd pipeline compile | run --local | submit | schedule | list | pause | resume | delete``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bockd.config import PRESETS, build_config, load_config, merge_overrides, parse_assignments
from bockd.errors import ConfigError
from bockd.pipeline.options import DEFAULT_VAL_FRACTION

# The quick start's choice: the most accurate student at most 30 % the size of S1.
DEMO_POLICY = {"max_size_pct": 30, "best_only": True}


# -- arguments --------------------------------------------------------------------------------------
def _mapping(text: str | None, field: str) -> dict[str, Any]:
    """Inline YAML/JSON (``{pareto: true}``) or ``@file.yaml``; parsed with safe_load only."""
    if not text:
        return {}
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        value = yaml.safe_load(raw)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{field}: cannot read {text!r}: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: expected a mapping such as '{{pareto: true}}', got {text!r}")
    return value


def _train_config(args: argparse.Namespace) -> dict[str, Any]:
    over = parse_assignments(args.set or [])
    model = over.setdefault("model", {})
    data = over.setdefault("data", {})
    for value, node, key in (
        (args.arch, model, "arch"),
        (args.num_students, model, "num_students"),
        (args.dataset, data, "dataset"),
        (args.data_path, data, "path"),
        (args.epochs, over, "epochs"),
    ):
        if value is not None:
            node[key] = value
    over.setdefault("runtime", {}).setdefault("progress", "log")
    config = load_config(args.config, over) if args.config else build_config(args.preset, over)
    if "val_fraction" not in config.data.model_fields_set:
        # No preset holds one out; unless --set or the config file says otherwise, the pipeline's default
        # validation split does, so that the cascade can be fitted (DEFAULT_TRAIN_CONFIG holds the same).
        held_out = {"data": {"val_fraction": DEFAULT_VAL_FRACTION}}
        config = build_config(None, merge_overrides(config.to_dict(), held_out))
    return config.to_dict()


def _baselines(text: str, num_students: int) -> list[int]:
    if text == "all":
        return list(range(1, num_students + 1))
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--baselines: expected all, none or a list like 1,3,5; got {text!r}") from None


def _run_parameters(args: argparse.Namespace, **fixed: Any) -> Any:
    from bockd.pipeline.parameters import RunParameters

    config = _train_config(args)
    values = {
        "train_config": config,
        "baseline_students": _baselines(args.baselines, config["model"]["num_students"]),
        "selection_policy": _mapping(args.policy, "--policy") if args.policy else dict(DEMO_POLICY),
        "model_prefix": args.model_prefix,
        "mlflow_experiment": args.mlflow_experiment,
        "checkpoint_uri": args.checkpoint_uri or "",
        "eval_device": args.eval_device,
        "quantization": _mapping(args.quantization, "--quantization"),
        "measurement": _mapping(args.measurement, "--measurement"),
        "cascade": _mapping(args.cascade, "--cascade"),
    }
    if args.mlflow_uri:
        values["mlflow_tracking_uri"] = args.mlflow_uri
    return RunParameters.build(**{**values, **fixed})


def _labels(pairs: list[str] | None, flag: str) -> dict[str, str]:
    selector = {}
    for pair in pairs or []:
        label, sep, value = pair.partition("=")
        if not sep or not label:
            raise ConfigError(f"{flag}: expected LABEL=VALUE, got {pair!r}")
        selector[label] = value
    return selector


def _settings(args: argparse.Namespace) -> Any:
    from bockd.pipeline.settings import GpuNode, MeasureNode, PipelineSettings

    selector = _labels(args.node_selector, "--node-selector")
    gpu = None
    if args.gpus > 0:
        gpu = GpuNode(
            accelerator=args.gpu_type,
            count=args.gpus,
            node_selector=selector,
            toleration=None if args.toleration == "none" else args.toleration,
            cpu_request=args.cpu_request,
            memory_request=args.memory_request,
            shm_size=args.shm_size,
        )
    return PipelineSettings(
        trainer_image=args.trainer_image,
        gpu=gpu,
        s3_secret=args.s3_secret or None,
        mlflow_secret=args.mlflow_secret or None,
        s3_endpoint=args.s3_endpoint,
        retries=args.retries,
        num_nodes=args.num_nodes,
        staging_uri=args.staging_uri,
        measure=MeasureNode(
            cpu=args.measure_cpu or None,
            memory=args.measure_memory,
            node_selector=_labels(args.measure_node_selector, "--measure-node-selector"),
        ),
    )


def _compile(args: argparse.Namespace, path: Path) -> Path:
    from kfp import compiler

    from bockd.pipeline.pipeline import build_pipeline

    compiler.Compiler().compile(build_pipeline(_settings(args)), str(path))
    return path


# -- commands ---------------------------------------------------------------------------------------
def cmd_compile(args: argparse.Namespace) -> int:
    print(f"compiled: {_compile(args, Path(args.output))}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise ConfigError("pipeline run: only --local runs here; use `bockd pipeline submit` for a cluster")
    from bockd.pipeline.local import run_local
    from bockd.pipeline.summary import print_local_summary

    state = Path(args.state_dir).absolute()
    # The local MLflow URI is only known once the services are up; validate everything else first.
    params = _run_parameters(
        args,
        mlflow_tracking_uri="http://127.0.0.1:1",
        deploy_mode="none" if args.no_deploy else "local",
        local_serving_dir=str(state / "serving"),
        checkpoint_uri=args.checkpoint_uri or "s3://bockd/checkpoints",
    )
    if not args.no_deploy and params.fits_cascade:
        # The quick start serves the cascade beside the chosen student: one more local model server.
        params = params.model_copy(update={"deploy_options": {**params.deploy_options, "cascade": True}})
    _check_local_data(params.train_config)  # before anything starts; S3 buckets once the store is up
    from bockd.platform.services import up

    info = up(state)
    os.environ.update(info.env())  # the bucket check and the prediction below talk to the local stack
    params = params.model_copy(update={"mlflow_tracking_uri": info.mlflow_uri})
    params.check_buckets()
    # sys.stdout as it is now: a default bound at import could be a stream that is closed by now.
    run = run_local(params, state, out=sys.stdout)
    print_local_summary(run, mlflow_uri=info.mlflow_uri, out=sys.stdout)
    return 0


def _check_local_data(train_config: dict[str, Any]) -> None:
    """A local run's tasks read ``data.path`` on this machine: fail now, with the data reader's own
    message, if it cannot hold the dataset (missing path, files or layout), not 40 s into prepare-data."""
    from bockd.data import check_source
    from bockd.platform.s3 import is_s3_uri

    data = train_config["data"]
    if not is_s3_uri(data.get("path")):
        check_source(data["dataset"], data.get("path"), download=bool(data.get("download")))


def _client(args: argparse.Namespace) -> Any:
    from bockd.pipeline import cluster

    return cluster.connect(args.host, namespace=args.namespace, token_env=args.token_env)


def _cluster_deploy(args: argparse.Namespace) -> dict[str, Any]:
    options = {}
    for pair in args.deploy_option or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--deploy-option: expected KEY=VALUE (e.g. canary_traffic_percent=20), got {pair!r}"
            )
        options[key] = yaml.safe_load(value)
    return {
        "deploy_mode": args.deploy,
        "serving_namespace": args.serving_namespace or args.namespace or "",
        "deploy_options": options,
        "mlflow_artifacts_destination": args.mlflow_artifacts,
    }


@contextlib.contextmanager
def _checked_package(args: argparse.Namespace) -> Iterator[tuple[Any, Path]]:
    """Validated run parameters (buckets checked when S3 is reachable) and the freshly compiled package."""
    params = _run_parameters(args, **_cluster_deploy(args))
    params.check_buckets(required=False)
    with tempfile.TemporaryDirectory() as tmp:
        yield params, _compile(args, Path(tmp) / "pipeline.yaml")


def cmd_submit(args: argparse.Namespace) -> int:
    from bockd.pipeline import cluster

    with _checked_package(args) as (params, package):
        info = cluster.submit(
            _client(args),
            package,
            experiment=args.experiment,
            run_name=args.run_name,
            params=params.arguments(),
            namespace=args.namespace,
        )
    print(f"run {info.run_id} submitted: {info.url}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from bockd.pipeline import cluster

    cron = cluster.validate_cron(args.cron)
    with _checked_package(args) as (params, package):
        info = cluster.schedule(
            _client(args),
            package,
            experiment=args.experiment,
            job_name=args.name,
            cron=cron,
            params=params.arguments(),
            pipeline_name=args.pipeline_name,
            version=args.version,
            namespace=args.namespace,
        )
    print(f"recurring run {info.id} ({info.name}): cron {info.cron!r}, max concurrency 1, no catch-up")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from bockd.pipeline import cluster

    schedules = cluster.list_schedules(_client(args), args.experiment, args.namespace)
    for s in schedules:
        state = "enabled" if s.enabled else "paused"
        version = s.pipeline_version_id or "latest"
        print(f"{s.id}  {s.name:<30} {state:<8} cron={s.cron!r} version={version}")
    if not schedules:
        print("no recurring runs")
    return 0


def cmd_schedule_action(args: argparse.Namespace) -> int:
    from bockd.pipeline import cluster

    action = {"pause": cluster.pause, "resume": cluster.resume, "delete": cluster.delete}[args.pipeline_cmd]
    action(_client(args), args.id)
    print(f"{args.pipeline_cmd}: {args.id}")
    return 0


# -- parser -----------------------------------------------------------------------------------------
def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train (the train_config parameter)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    g.add_argument("--config", help="YAML training config (preset: plus overrides)")
    g.add_argument("--dataset", help="digits, cifar10, cifar100, fashion-mnist, imagefolder")
    g.add_argument("--data-path", help="archive, folder or s3://bucket/prefix")
    g.add_argument("--arch")
    g.add_argument("--num-students", type=int)
    g.add_argument("--epochs", type=int)
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config value, e.g. optim.lr=0.05")
    g = p.add_argument_group("the rest of the run")
    g.add_argument(
        "--baselines", default="all", help="all, or student numbers like 1,5 (default all; at least one)"
    )
    g.add_argument(
        "--policy",
        help="selection policy, inline YAML or @file (default: "
        f"{json.dumps(DEMO_POLICY)}); keys: students, min_top1, max_params, max_size_pct, "
        "max_latency_ms (served p50 of one image, measured), pareto, beat_champion, best_only",
    )
    g.add_argument(
        "--quantization",
        help="int8 versions, inline YAML or @file (default: {enabled: true, max_drop: 1.0, "
        "calibration_images: 512}); also per_channel, reduce_range",
    )
    g.add_argument(
        "--measurement",
        help="latency through the model server, inline YAML or @file (default: {enabled: true, "
        "batch_sizes: [1, 32], requests: 30, batch_requests: 8, warmup: 3, threads: 1}); also "
        "confidence, min_speedup (the int8 faster rule)",
    )
    g.add_argument(
        "--cascade",
        help="confidence cascade, inline YAML or @file (default: {enabled: true, students: [] (the "
        "smallest, the middle and the largest), max_drop: 0.5}); or target_top1 instead of max_drop. "
        "Fitted on the validation split (data.val_fraction, default 0.1 here)",
    )
    g.add_argument("--model-prefix", default="bockd", help="registered models are PREFIX-DATASET-ARCH-sK")
    g.add_argument("--mlflow-uri", help="MLflow tracking server (local runs: the embedded one)")
    g.add_argument("--mlflow-experiment", default="bockd")
    g.add_argument("--checkpoint-uri", help="s3://bucket/prefix where training checkpoints go (resume)")
    g.add_argument("--eval-device", default="cpu", help="where evaluation and latency run (default cpu)")


def _cluster_options(p: argparse.ArgumentParser) -> None:
    from bockd.pipeline.settings import DEFAULT_S3_ENDPOINT, DEFAULT_TRAINER_IMAGE, GpuNode

    gpu = GpuNode()
    g = p.add_argument_group("cluster settings (compiled into the pipeline)")
    g.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE)
    g.add_argument("--gpu-type", default=gpu.accelerator, help="accelerator resource name")
    g.add_argument("--gpus", type=int, default=gpu.count, help="GPUs per training task (0: CPU)")
    g.add_argument("--node-selector", action="append", metavar="LABEL=VALUE", help="repeatable")
    g.add_argument("--toleration", default=gpu.toleration, help="taint key to tolerate, or none")
    g.add_argument("--cpu-request", default=gpu.cpu_request)
    g.add_argument("--memory-request", default=gpu.memory_request)
    g.add_argument("--shm-size", default=gpu.shm_size, help="memory-backed /dev/shm size")
    g.add_argument(
        "--s3-secret", default="bockd-s3", help="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )
    g.add_argument("--mlflow-secret", default="bockd-mlflow", help="optional Secret with MLFLOW_TRACKING_*")
    g.add_argument(
        "--s3-endpoint",
        default=DEFAULT_S3_ENDPOINT,
        help="the tasks' S3 endpoint (default: Kubeflow's SeaweedFS; MinIO: http://minio-service.kubeflow:9000)",
    )
    g.add_argument("--retries", type=int, default=3, help="retries of register, select, deploy")
    g.add_argument(
        "--num-nodes", type=int, default=1, help="training nodes; >1 (or --gpus >1) trains through a TrainJob"
    )
    g.add_argument("--staging-uri", default="s3://bockd/staging", help="TrainJob request, data copy, outputs")
    g.add_argument(
        "--measure-cpu",
        help="CPU request and limit of the measure step, as the serving pods get (default: none)",
    )
    g.add_argument("--measure-memory", default="4Gi", help="memory of the measure step (with --measure-cpu)")
    g.add_argument(
        "--measure-node-selector",
        action="append",
        metavar="LABEL=VALUE",
        help="run the measure step on the node type that serves (repeatable)",
    )


def _deploy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment of the selected students (KServe InferenceServices)")
    g.add_argument("--deploy", choices=["cluster", "none"], default="cluster")
    g.add_argument("--serving-namespace", help="where the InferenceServices go (default: --namespace)")
    g.add_argument(
        "--deploy-option",
        action="append",
        metavar="KEY=VALUE",
        help="canary_traffic_percent, deployment_mode (Knative|Standard), min_replicas, max_replicas, "
        "scale_metric, scale_target, service_account, runtime, backend, timeout_s, cascade (true: also "
        "deploy the fitted cascade as one InferenceService)",
    )
    g.add_argument(
        "--mlflow-artifacts",
        default="s3://bockd/mlflow",
        help="the MLflow server's --artifacts-destination (where registered files live in S3)",
    )


def _host_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"
    )
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user)")
    p.add_argument("--token-env", default="KFP_TOKEN", help="environment variable holding the bearer token")


def add_parser(sub: Any) -> None:
    pipe = sub.add_parser("pipeline", help="compile, run locally, submit or schedule the Kubeflow pipeline")
    cmds = pipe.add_subparsers(dest="pipeline_cmd", required=True)

    p = cmds.add_parser("compile", help="write the pipeline IR YAML")
    p.add_argument("-o", "--output", default="pipeline.yaml")
    _cluster_options(p)
    p.set_defaults(func=cmd_compile)

    p = cmds.add_parser("run", help="run the whole pipeline on this machine (kfp.local + embedded services)")
    p.add_argument("--local", action="store_true", required=True)
    p.add_argument("--state-dir", default=".bockd", help="services, runs and local model servers")
    p.add_argument("--no-deploy", action="store_true", help="skip the local model servers")
    _run_options(p)
    p.set_defaults(func=cmd_run)

    p = cmds.add_parser("submit", help="submit one run to a Kubeflow Pipelines cluster")
    _host_options(p)
    p.add_argument("--experiment", default="bockd", help="KFP experiment")
    p.add_argument("--run-name", default="bockd")
    _run_options(p)
    _deploy_options(p)
    _cluster_options(p)
    p.set_defaults(func=cmd_submit)

    p = cmds.add_parser("schedule", help="create a recurring run (max concurrency 1, no catch-up, no cache)")
    _host_options(p)
    p.add_argument("--cron", required=True, help="KFP cron, seconds first: '0 0 3 * * 1' (5 fields: +'0 ')")
    p.add_argument("--name", default="bockd-retrain", help="recurring run name")
    p.add_argument("--experiment", default="bockd")
    p.add_argument("--pipeline-name", default="bockd")
    p.add_argument("--version", choices=["pin", "latest"], default="pin", help="pipeline version to run")
    _run_options(p)
    _deploy_options(p)
    _cluster_options(p)
    p.set_defaults(func=cmd_schedule)

    p = cmds.add_parser("list", help="list recurring runs")
    _host_options(p)
    p.add_argument("--experiment")
    p.set_defaults(func=cmd_list)

    for action in ("pause", "resume", "delete"):
        p = cmds.add_parser(action, help=f"{action} a recurring run")
        _host_options(p)
        p.add_argument("id", help="recurring run id")
        p.set_defaults(func=cmd_schedule_action)
