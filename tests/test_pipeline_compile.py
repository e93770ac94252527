"""The compiled pipeline IR: where the GPU node, secrets, caching and retries end up, and what never does.

These read the YAML the real KFP compiler writes (the same file `bockd pipeline compile` and `submit`
produce); no cluster is involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import compiler

from bockd.cli import main
from bockd.pipeline.pipeline import build_pipeline
from bockd.pipeline.settings import GpuNode, PipelineSettings

TRAINING = ("exec-train-ensemble", "exec-train-baseline")
LOCAL_ONLY = {"exec-evaluate", "exec-quantize"}  # read only their input artifacts: no credentials
SECRET_VALUES = ("AKIAEXAMPLESECRETKEY1", "wJalrXUtnFEMI-example-secret-value")


def compile_to(tmp_path: Path, settings: PipelineSettings | None = None) -> tuple[str, dict, dict]:
    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(settings), str(path))
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, dict]:
    settings = PipelineSettings(
        trainer_image="registry.example.com/bockd/trainer:1.2.3",
        gpu=GpuNode(
            accelerator="nvidia.com/gpu",
            count=1,
            node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            cpu_request="12",
            memory_request="64Gi",
            shm_size="16Gi",
        ),
        s3_secret="team-s3",
        mlflow_secret="team-mlflow",
        s3_endpoint="http://minio-service.kubeflow:9000",  # an override: a cluster that still runs MinIO
        retries=4,
    )
    return compile_to(tmp_path_factory.mktemp("ir"), settings)


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (loops included), by task name."""
    tasks: dict[str, dict] = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_training_tasks_ask_for_the_gpu_node(compiled: tuple[str, dict, dict]) -> None:
    _, spec, platform = compiled
    for executor in TRAINING:
        resources = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"
        assert resources["resourceCpuRequest"] == "12"
        assert resources["resourceMemoryRequest"] == "64Gi"
        k8s = platform[executor]
        assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert k8s["emptyDirMounts"] == [
            {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"}
        ]
    # Only training needs the GPU node.
    for executor in ("exec-evaluate", "exec-register", "exec-deploy", "exec-prepare-data"):
        assert "accelerator" not in spec["deploymentSpec"]["executors"][executor]["container"].get(
            "resources", {}
        )
        assert "tolerations" not in platform.get(executor, {})


def test_credentials_reach_tasks_only_as_secret_refs(compiled: tuple[str, dict, dict]) -> None:
    _, spec, platform = compiled
    for executor in spec["deploymentSpec"]["executors"]:
        if executor in LOCAL_ONLY:
            continue
        refs = {ref["secretName"]: ref for ref in platform[executor]["secretAsEnv"]}
        s3 = refs["team-s3"]
        assert {(k["secretKey"], k["envVar"]) for k in s3["keyToEnv"]} == {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
        }
        assert s3["optional"] is False
        assert refs["team-mlflow"]["optional"] is True
        env = spec["deploymentSpec"]["executors"][executor]["container"].get("env", [])
        assert {"name": "BOCKD_S3_ENDPOINT", "value": "http://minio-service.kubeflow:9000"} in env
        assert not any("SECRET" in e["name"] or "PASSWORD" in e["name"] for e in env)


@pytest.mark.parametrize(
    ("argv", "endpoint"),
    [
        ([], "http://seaweedfs.kubeflow:9000"),  # KFP >= 2.16 ships SeaweedFS, Service seaweedfs.kubeflow
        (["--s3-endpoint", "http://minio-service.kubeflow:9000"], "http://minio-service.kubeflow:9000"),
    ],
)
def test_every_task_gets_kubeflows_object_store_unless_overridden(
    tmp_path: Path, argv: list[str], endpoint: str
) -> None:
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "-o", str(out), *argv]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    for name in set(executors) - LOCAL_ONLY:
        assert {"name": "BOCKD_S3_ENDPOINT", "value": endpoint} in executors[name]["container"]["env"], name


def test_no_credential_value_appears_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the compiling process's environment must not leak into the YAML."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_VALUES[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUES[1])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET_VALUES[1])
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "-o", str(out)]) == 0
    text = out.read_text()
    for value in SECRET_VALUES:
        assert value not in text
    spec = next(yaml.safe_load_all(text))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert not any("secret" in name or "password" in name or "key" in name for name in params)


def test_caching_off_for_data_and_training_retries_on_network_steps(compiled: tuple[str, dict, dict]) -> None:
    _, spec, _ = compiled
    tasks = _tasks(spec)
    # measure: timings belong to the machine that took them, never to a cached run's.
    for name in ("prepare-data", "train-ensemble", "train-baseline", "measure"):
        assert not tasks[name]["cachingOptions"].get("enableCache", False), name
    for name in ("evaluate", "quantize", "report"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True, name
    for name in ("register", "select", "deploy"):
        policy = tasks[name]["retryPolicy"]
        assert policy["maxRetryCount"] == 4
        assert policy["backoffDuration"] == "30s"
    for name in ("prepare-data", "train-ensemble", "evaluate"):
        assert "retryPolicy" not in tasks[name], name


def test_pinned_images_and_nothing_installed_at_run_time(compiled: tuple[str, dict, dict]) -> None:
    text, spec, _ = compiled
    images = {e: x["container"]["image"] for e, x in spec["deploymentSpec"]["executors"].items()}
    assert set(images.values()) == {"registry.example.com/bockd/trainer:1.2.3"}
    assert "pip install" not in text
    assert ":latest" not in text


def test_typed_artifacts(compiled: tuple[str, dict, dict]) -> None:
    _, spec, _ = compiled
    comps = spec["components"]

    def outputs(comp: str) -> dict[str, str]:
        arts = comps[comp]["outputDefinitions"]["artifacts"]
        return {name: a["artifactType"]["schemaTitle"] for name, a in arts.items()}

    assert outputs("comp-prepare-data") == {"dataset": "system.Dataset"}
    assert outputs("comp-train-ensemble") == {"model": "system.Model", "metrics": "system.Metrics"}
    assert outputs("comp-evaluate") == {
        "evaluation": "system.Artifact",
        "metrics": "system.Metrics",
        "confusion": "system.ClassificationMetrics",
    }
    assert outputs("comp-quantize") == {"quantized": "system.Model", "metrics": "system.Metrics"}
    assert outputs("comp-measure") == {"measurements": "system.Artifact"}
    assert outputs("comp-report")["report"] == "system.HTML"
    register_inputs = comps["comp-register"]["inputDefinitions"]["artifacts"]
    for name in ("evaluations", "baselines", "quantized"):
        assert register_inputs[name]["isArtifactList"] is True, name
    for comp in ("comp-measure", "comp-select", "comp-report", "comp-deploy"):
        assert comps[comp]["inputDefinitions"]["artifacts"]["quantized"]["isArtifactList"] is True, comp


def test_quantize_runs_per_student_after_evaluate_and_measure_after_the_loop(
    compiled: tuple[str, dict, dict],
) -> None:
    _, spec, _ = compiled
    (loop,) = [c for c in spec["components"].values() if "evaluate" in c.get("dag", {}).get("tasks", {})]
    inside = loop["dag"]["tasks"]
    assert "evaluate" in inside["quantize"]["dependentTasks"]
    root = spec["root"]["dag"]["tasks"]
    assert "measure" in root and "quantize" not in root
    for step in ("register", "select", "report"):
        assert "measure" in root[step]["dependentTasks"], step
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["quantization"]["parameterType"] == "STRUCT"
    assert params["quantization"]["defaultValue"]["max_drop"] == 1.0
    assert params["measurement"]["defaultValue"]["batch_sizes"] == [1, 32]


def test_the_cascade_is_fitted_after_measure_and_feeds_register_report_and_deploy(
    compiled: tuple[str, dict, dict],
) -> None:
    _, spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    assert "measure" in root["cascade"]["dependentTasks"]
    for step in ("register", "report", "deploy"):
        assert "cascade" in root[step]["dependentTasks"], step
        source = root[step]["inputs"]["artifacts"]["cascade"]["taskOutputArtifact"]
        assert source == {"outputArtifactKey": "cascade", "producerTask": "cascade"}
    # Its costs may be timed on the step's own machine (measurement off): never from a cache.
    assert not root["cascade"]["cachingOptions"].get("enableCache", False)
    comp = spec["components"]["comp-cascade"]
    assert comp["outputDefinitions"]["artifacts"]["cascade"]["artifactType"]["schemaTitle"] == "system.Model"
    assert comp["inputDefinitions"]["artifacts"]["quantized"]["isArtifactList"] is True
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["cascade"]["parameterType"] == "STRUCT"
    assert params["cascade"]["defaultValue"] == {"enabled": True, "students": [], "max_drop": 0.5}
    # The default training config holds out the validation split the thresholds are fitted on.
    assert params["train_config"]["defaultValue"]["data"]["val_fraction"] == 0.1
    outputs = spec["root"]["outputDefinitions"]["artifacts"]
    assert outputs["cascade"]["artifactType"]["schemaTitle"] == "system.Model"


def test_the_measure_step_runs_where_students_are_served(tmp_path: Path) -> None:
    """--measure-cpu is request and limit (a serving pod's cgroup limit); the node selector places it."""
    out = tmp_path / "p.yaml"
    argv = ["--measure-cpu", "2", "--measure-node-selector", "node.kubernetes.io/instance-type=c7i.large"]
    assert main(["pipeline", "compile", "-o", str(out), *argv]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    resources = spec["deploymentSpec"]["executors"]["exec-measure"]["container"]["resources"]
    assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == ("2", "2")
    assert resources["resourceMemoryLimit"] == "4Gi"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in ("exec-measure", "exec-cascade"):  # the cascade may time its students there
        assert executors[executor]["nodeSelector"]["labels"] == {
            "node.kubernetes.io/instance-type": "c7i.large"
        }
    # By default the step asks for nothing: it lands wherever the cluster puts it.
    (tmp_path / "d").mkdir()
    default = compile_to(tmp_path / "d", PipelineSettings())
    assert "resourceCpuLimit" not in default[1]["deploymentSpec"]["executors"]["exec-measure"][
        "container"
    ].get("resources", {})


def test_cpu_settings_drop_the_gpu_node(tmp_path: Path) -> None:
    _, spec, platform = compile_to(tmp_path, PipelineSettings(gpu=None))
    container = spec["deploymentSpec"]["executors"]["exec-train-ensemble"]["container"]
    assert "accelerator" not in container.get("resources", {})
    assert "tolerations" not in platform["exec-train-ensemble"]


def test_compile_cli_options_reach_the_yaml(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    argv = [
        "pipeline",
        "compile",
        "-o",
        str(out),
        "--gpu-type",
        "amd.com/gpu",
        "--node-selector",
        "cloud.google.com/gke-accelerator=nvidia-a100",
    ]
    argv += ["--toleration", "none", "--trainer-image", "example.com/t:9", "--s3-secret", "other-s3"]
    assert main(argv) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    executors: dict[str, Any] = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = spec["deploymentSpec"]["executors"]["exec-train-ensemble"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "amd.com/gpu"
    assert train["image"] == "example.com/t:9"
    assert executors["exec-train-ensemble"]["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-accelerator": "nvidia-a100"
    }
    assert "tolerations" not in executors["exec-train-ensemble"]
    assert executors["exec-register"]["secretAsEnv"][0]["secretName"] == "other-s3"


def test_several_gpus_train_through_a_trainjob_launcher(tmp_path: Path) -> None:
    """--gpus 4 --num-nodes 2: a light launcher task creates the TrainJob; it asks for no GPU itself."""
    gpu = GpuNode(count=4, node_selector={"pool": "h100"})
    _, spec, platform = compile_to(
        tmp_path, PipelineSettings(gpu=gpu, num_nodes=2, staging_uri="s3://b/stage")
    )
    executors = spec["deploymentSpec"]["executors"]
    assert "exec-train-ensemble" not in executors
    assert "accelerator" not in executors["exec-train-distributed"]["container"].get("resources", {})
    assert "tolerations" not in platform["exec-train-distributed"]
    assert {r["secretName"] for r in platform["exec-train-distributed"]["secretAsEnv"]} == {
        "bockd-s3",
        "bockd-mlflow",
    }
    inputs = _tasks(spec)["train-distributed"]["inputs"]["parameters"]
    constant = {k: v["runtimeValue"]["constant"] for k, v in inputs.items() if "runtimeValue" in v}
    assert constant["num_nodes"] == 2 and constant["gpus_per_node"] == 4
    assert constant["node_selector"] == {"pool": "h100"}
    assert constant["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert constant["staging_uri"] == "s3://b/stage"
    # Baselines train one student each: one GPU on one node.
    baseline = executors["exec-train-baseline"]["container"]["resources"]["accelerator"]
    assert baseline["resourceCount"] == "1"
