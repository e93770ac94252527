"""Registering exported students in a real MLflow server (the embedded local stack) and moving @champion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from bockd.data import ImageDataset
from bockd.export import export_student, read_student_config
from bockd.platform.model_registry import CHAMPION, promote_champion, register_student, registered_model_name
from bockd.platform.services import ServicesInfo
from bockd.quantize import quantize_student


@pytest.fixture(scope="module")
def exported(ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_student(ensemble_run, tmp_path_factory.mktemp("export") / "s2", index=1)


def _run(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name("registry-test")
    experiment_id = found.experiment_id if found else client.create_experiment("registry-test")
    return client.create_run(experiment_id, run_name=name).info.run_id


def test_model_name_is_sanitized() -> None:
    assert registered_model_name("bockd", "fashion mnist", "resnet20", 0) == "bockd-fashion-mnist-resnet20-s1"


def test_registration_is_idempotent_and_carries_the_exported_student(
    mlflow_stack: ServicesInfo, exported: Path, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_stack.mlflow_uri)
    run_id = _run(client, "train-1")
    first = register_student(client, run_id, exported, prefix="t1", dataset="digits", tags={"top1": "90.0"})
    again = register_student(client, run_id, exported, prefix="t1", dataset="digits", tags={"top1": "90.0"})
    assert first.created and not again.created
    assert (again.name, again.version) == (first.name, first.version) == ("t1-digits-resnet20-s2", "1")
    assert len(client.search_model_versions(f"name = '{first.name}'")) == 1

    version = client.get_model_version(first.name, first.version)
    assert (
        version.tags["params"] == str(read_student_config(exported)["params"])
        and version.tags["student"] == "S2"
        and version.tags["top1"] == "90.0"
    )
    local = Path(client.download_artifacts(run_id, "students/s2", str(tmp_path)))
    assert {"model.onnx", "model.safetensors", "config.json", "MLmodel"} <= {p.name for p in local.iterdir()}
    assert not list(local.glob("*.pkl")) and not list(local.glob("*.pt"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "onnx" in mlmodel["flavors"] and "signature" in mlmodel
    assert '"input"' in mlmodel["signature"]["inputs"] and "[-1, 1, 8, 8]" in mlmodel["signature"]["inputs"]


def test_an_int8_version_registers_beside_fp32_idempotently(
    mlflow_stack: ServicesInfo, exported: Path, digits: ImageDataset, tmp_path: Path
) -> None:
    """Same registered model, another version tagged precision=int8; a re-run finds each precision's own."""
    int8 = quantize_student(exported, tmp_path / "s2-int8", digits.train.x, max_images=64)
    (int8 / "quantization.json").write_text('{"format": "bockd-quantization-check/1"}')
    client = MlflowClient(mlflow_stack.mlflow_uri)
    run_id = _run(client, "train-int8")
    fp32 = register_student(client, run_id, exported, prefix="t3", dataset="digits")
    first = register_student(client, run_id, int8, prefix="t3", dataset="digits", tags={"top1": "89.0"})
    assert first.created and first.name == fp32.name and first.version != fp32.version
    again = [register_student(client, run_id, d, prefix="t3", dataset="digits") for d in (exported, int8)]
    assert [(r.version, r.created) for r in again] == [(fp32.version, False), (first.version, False)]
    tags = {v.version: v.tags for v in client.search_model_versions(f"name = '{fp32.name}'")}
    assert {v: t["precision"] for v, t in tags.items()} == {fp32.version: "fp32", first.version: "int8"}
    assert tags[first.version]["top1"] == "89.0"
    local = Path(client.download_artifacts(run_id, "students/s2-int8", str(tmp_path / "dl")))
    names = {p.name for p in local.iterdir()}
    assert {"model.onnx", "config.json", "quantization.json", "MLmodel"} <= names
    assert "model.safetensors" not in names  # there are no int8 PyTorch weights


def test_champion_moves_only_on_a_strictly_better_score_on_the_same_test_set(
    mlflow_stack: ServicesInfo, exported: Path
) -> None:
    client = MlflowClient(mlflow_stack.mlflow_uri)
    versions = []
    for i in range(4):
        run_id = _run(client, f"train-{i}")
        versions.append((register_student(client, run_id, exported, prefix="t2", dataset="digits"), run_id))
    name = versions[0][0].name

    moved, why = promote_champion(client, name, "1", top1=90.0, test_set="sha-a", run_id=versions[0][1])
    assert moved and "first champion" in why
    moved, why = promote_champion(client, name, "2", top1=90.0, test_set="sha-a", run_id=versions[1][1])
    assert not moved and "does not beat" in why  # equal is not better
    moved, why = promote_champion(client, name, "3", top1=91.5, test_set="sha-b", run_id=versions[2][1])
    assert not moved and "another test set" in why
    moved, why = promote_champion(client, name, "4", top1=91.5, test_set="sha-a", run_id=versions[3][1])
    assert moved and "was v1" in why
    assert client.get_model_version_by_alias(name, CHAMPION).version == "4"
    record = client.get_model_version(name, "4").tags[f"alias.{CHAMPION}.set"]
    assert versions[3][1] in record


class _FlakyRegistry:
    """A reverse proxy in front of the real MLflow server that answers the @champion lookup
    (GET /api/2.0/mlflow/registered-models/alias) with 503 while ``failing`` is set: a registry that is
    restarting or overloaded. Everything else goes through to the real server unchanged."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.failing = False
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.failing and self.path.startswith("/api/2.0/mlflow/registered-models/alias"):
                    data = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "upstream busy"}'
                    self.send_response(503)
                else:
                    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    conn.request(self.command, self.path, body or None, headers)
                    reply = conn.getresponse()
                    data = reply.read()
                    self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_registry_that_fails_to_answer_is_never_read_as_no_champion(
    mlflow_stack: ServicesInfo, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 on the champion lookup must fail the promotion (KFP retries the step), never move
    @champion to a worse model (the case in ../shared/cases/registry-transient-error)."""
    from mlflow.exceptions import MlflowException

    from bockd.pipeline.records import EvaluationRecord, Registration
    from bockd.pipeline.steps import select_students

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast instead of MLflow's back-off
    flaky = _FlakyRegistry(mlflow_stack.mlflow_uri)
    client = MlflowClient(flaky.uri)
    runs = [_run(client, f"flaky-{i}") for i in range(2)]
    versions = [register_student(client, r, exported, prefix="t3", dataset="digits") for r in runs]
    name = versions[0].name
    assert promote_champion(client, name, "1", top1=95.0, test_set="sha-t", run_id=runs[0])[0]
    worse = EvaluationRecord(
        student=2,
        label="S2",
        student_name="s2",
        params=1,
        size_pct=1.0,
        top1=60.0,
        top5=90.0,
        num_test=100,
        classes=["a", "b"],
        confusion=[[50, 0], [40, 10]],
        per_class_accuracy=[100.0, 20.0],
        flops=1,
        latency_ms={"1": {"p50": 1.0}},
        test_set="sha-t",
        config={},
    )
    registration = [Registration(student=2, registered_model=name, version="2", created=True)]
    try:
        flaky.failing = True
        with pytest.raises(MlflowException, match=r"upstream busy|503"):
            promote_champion(client, name, "2", top1=60.0, test_set="sha-t", run_id=runs[1])
        with pytest.raises(MlflowException, match=r"upstream busy|503"):
            select_students(
                [worse],
                [],
                registration,
                {"beat_champion": True},
                tracking_uri=flaky.uri,
                run_id="",
            )
    finally:
        flaky.failing = False
        flaky.server.shutdown()
    assert MlflowClient(mlflow_stack.mlflow_uri).get_model_version_by_alias(name, CHAMPION).version == "1"


def test_no_model_and_no_alias_both_mean_no_champion(mlflow_stack: ServicesInfo, exported: Path) -> None:
    from bockd.platform.model_registry import champion_version

    client = MlflowClient(mlflow_stack.mlflow_uri)
    assert champion_version(client, "t4-never-registered") is None
    version = register_student(client, _run(client, "t4"), exported, prefix="t4", dataset="digits")
    assert champion_version(client, version.name) is None  # registered, no alias yet
