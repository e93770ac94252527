"""The embedded stack with real servers: SeaweedFS (`weed mini`) and an MLflow tracking server.

One stack is started per module (start-up takes ~10 s) and always stopped at the end.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import minio
import pytest
from minio.error import S3Error

from bockd.platform.services import BUCKET, ServiceError, ServicesInfo, down, status, up
from bockd.platform.services.processes import cmdline, owns, stop


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bockd-state")


@pytest.fixture(scope="module")
def stack(state_dir: Path) -> Iterator[ServicesInfo]:
    try:
        yield up(state_dir, timeout=90)
    finally:
        down(state_dir)


def _s3(info: ServicesInfo, access: str | None = None, secret: str | None = None) -> minio.Minio:
    creds = info.credentials()
    return minio.Minio(
        info.s3_endpoint.removeprefix("http://"),
        access_key=access or creds.access_key,
        secret_key=secret or creds.secret_key,
        secure=False,
    )


def test_up_returns_endpoints_and_env(stack: ServicesInfo) -> None:
    assert stack.s3_endpoint.startswith("http://127.0.0.1:")
    assert stack.mlflow_uri.startswith("http://127.0.0.1:")
    env = stack.env()
    assert env["MLFLOW_TRACKING_URI"] == stack.mlflow_uri
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["BOCKD_S3_ENDPOINT"] == stack.s3_endpoint
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert _s3(stack).bucket_exists(BUCKET)


def test_object_round_trip(stack: ServicesInfo) -> None:
    client = _s3(stack)
    client.put_object(BUCKET, "tests/hello.txt", io.BytesIO(b"hello"), 5)
    assert client.get_object(BUCKET, "tests/hello.txt").read() == b"hello"


def test_wrong_credentials_are_refused(stack: ServicesInfo) -> None:
    creds = stack.credentials()
    for access, secret in ((creds.access_key, "not-the-secret"), ("nobody", "nothing")):
        bad = _s3(stack, access, secret)
        with pytest.raises(S3Error):
            bad.list_buckets()
        with pytest.raises(S3Error):
            bad.put_object(BUCKET, "tests/evil.txt", io.BytesIO(b"x"), 1)


def test_mlflow_run_with_artifact_lands_in_s3(stack: ServicesInfo, tmp_path: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)
    exp_id = client.create_experiment("services-test")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "acc", 0.5)
    src = tmp_path / "note.txt"
    src.write_text("artifact body")
    client.log_artifact(run.info.run_id, str(src))
    client.set_terminated(run.info.run_id)

    assert client.get_run(run.info.run_id).data.metrics["acc"] == 0.5
    got = Path(client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl")))
    assert got.read_text() == "artifact body"
    keys = [o.object_name for o in _s3(stack).list_objects(BUCKET, prefix="mlflow/", recursive=True)]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys


def test_credentials_are_private_and_never_logged(stack: ServicesInfo, state_dir: Path) -> None:
    cred_file = state_dir / "credentials.env"
    assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((state_dir / "s3-identities.json").stat().st_mode) == 0o600
    secret = stack.credentials().secret_key
    assert len(secret) >= 32
    assert secret not in (state_dir / "services.json").read_text()
    logs = list((state_dir / "logs").glob("*.log"))
    assert len(logs) == 2
    for log in logs:
        assert secret not in log.read_text(errors="replace"), log
    for pid in (stack.s3.pid, stack.mlflow.pid):  # not visible in `ps` either
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue  # exited while we looked
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def test_mlflow_runs_no_job_workers(stack: ServicesInfo) -> None:
    # MLflow's job runner + huey consumers (~270 MB each) serve GenAI jobs bockd never submits. The runner
    # is spawned right after the web server, before /health answers, so it would be visible by now.
    commands = [" ".join(cmdline(pid)) for pid in _descendants(stack.mlflow.pid)]
    assert commands and all("uvicorn" in c or "mlflow server" in c for c in commands), commands
    assert not [c for c in commands if "mlflow.server.jobs" in c or "huey" in c], commands


def test_up_is_idempotent_and_status_reports_running(stack: ServicesInfo, state_dir: Path) -> None:
    again = up(state_dir)
    assert (again.s3.pid, again.mlflow.pid) == (stack.s3.pid, stack.mlflow.pid)
    st = status(state_dir)
    assert st.running
    assert st["seaweedfs"].pid == stack.s3.pid and st["seaweedfs"].healthy
    assert st["mlflow"].endpoint == stack.mlflow_uri and st["mlflow"].healthy
    record = json.loads((state_dir / "services.json").read_text())
    assert record["s3"]["pid"] == stack.s3.pid


def test_taken_port_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServiceError, match=rf"mlflow.*port {port}"):
            up(tmp_path / "other", mlflow_port=port)
        with pytest.raises(ServiceError, match=rf"seaweedfs.*port {port}"):
            up(tmp_path / "other", s3_port=port)
    assert not (tmp_path / "other" / "services.json").exists()
    assert not (tmp_path / "other" / "logs").exists()  # nothing was started


def test_down_never_signals_a_foreign_pid() -> None:
    # Our own PID stands in for a recycled one: its command line is not `weed`/`mlflow` of a state folder.
    assert not owns(os.getpid(), ["weed"])
    assert stop(os.getpid(), ["mlflow", "/no/such/state"]) is False


def test_down_stops_then_up_keeps_data(stack: ServicesInfo, state_dir: Path) -> None:
    import mlflow

    # Self-contained (the suite may run split across xdist workers): make the data to find after restart.
    mlflow.MlflowClient(tracking_uri=stack.mlflow_uri).create_experiment("before-restart")
    _s3(stack).put_object(BUCKET, "tests/kept.txt", io.BytesIO(b"kept"), 4)

    down(state_dir)
    assert not owns(stack.s3.pid, ["weed"])
    assert not owns(stack.mlflow.pid, ["mlflow"])
    assert not (state_dir / "services.json").exists()
    assert not status(state_dir).running
    down(state_dir)  # harmless

    info = up(state_dir, timeout=90)
    assert info.s3.pid != stack.s3.pid
    client = mlflow.MlflowClient(tracking_uri=info.mlflow_uri)
    assert client.get_experiment_by_name("before-restart") is not None
    assert _s3(info).get_object(BUCKET, "tests/kept.txt").read() == b"kept"
