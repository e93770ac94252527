"""`up`, `down` and `status` of the embedded stack: SeaweedFS (`weed mini`) + MLflow tracking server."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bockd.platform.credentials import ACCESS_KEY_ID, SECRET_ACCESS_KEY
from bockd.platform.services import health, processes
from bockd.platform.services.errors import ServiceError
from bockd.platform.services.processes import HOST
from bockd.platform.services.state import (
    BUCKET,
    Credentials,
    Layout,
    ServiceRecord,
    ServicesInfo,
    load_or_create_credentials,
    load_record,
    read_credentials,
    save_record,
    write_s3_identities,
)

DEFAULT_STATE_DIR = Path(".bockd")
S3 = "seaweedfs"
MLFLOW = "mlflow"
# `weed mini` runs master, volume, filer, S3 and admin servers; every port is passed explicitly so none
# falls back to a fixed default (9333, 8888, 23646, ...) that could clash or bind elsewhere.
_WEED_INTERNAL = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# MLflow 3.x's server starts a job runner and seven huey consumers (~270 MB each) for GenAI jobs (scorers,
# trace rollups) that bockd never submits. This is mlflow's documented switch (environment_variables.py:
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION, read in mlflow/server/__init__.py `_run_server`); with it off the
# server runs no job workers, and a job request would get a clear "not enabled" error.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass(frozen=True)
class ServiceState:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    endpoint: str | None
    log: str | None


@dataclass(frozen=True)
class ServicesStatus:
    state_dir: Path
    services: tuple[ServiceState, ...]

    @property
    def running(self) -> bool:
        return bool(self.services) and all(s.running and s.healthy for s in self.services)

    def __getitem__(self, name: str) -> ServiceState:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


def weed_argv(layout: Layout, s3_port: int, internal: Mapping[str, int]) -> list[str]:
    """The `weed mini` command line. It names only the identity file, never a secret."""
    argv = [
        processes.find_executable("weed"),
        "mini",
        f"-dir={layout.seaweed_dir.resolve()}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.port={s3_port}",
        f"-s3.config={layout.s3_identities.resolve()}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",  # offline by design: no phoning home
    ]
    argv += [f"-{flag}={internal[flag]}" for flag in _WEED_INTERNAL]
    return argv


def mlflow_argv(layout: Layout, port: int, bucket: str) -> list[str]:
    """`mlflow server` proxying artifacts (clients need no S3 access) into the SeaweedFS bucket."""
    return [
        processes.find_executable("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{layout.mlflow_db.resolve()}",
        "--serve-artifacts",
        "--artifacts-destination",
        f"s3://{bucket}/mlflow",
    ]


def _child_env(s3_endpoint: str | None, creds: Credentials | None) -> dict[str, str]:
    env = dict(os.environ)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if s3_endpoint and creds:
        # Secrets travel in the environment only: command lines are world-readable through `ps`.
        env |= {
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            ACCESS_KEY_ID: creds.access_key,
            SECRET_ACCESS_KEY: creds.secret_key,
            "AWS_DEFAULT_REGION": env.get("AWS_DEFAULT_REGION", "us-east-1"),
        }
    return env


def _markers(layout: Layout, name: str) -> tuple[str, ...]:
    # Program name + a path only our process of this state folder has on its command line.
    if name == S3:
        return ("weed", str(layout.seaweed_dir.resolve()))
    return ("mlflow", str(layout.mlflow_db.resolve()))


def _healthy(info: ServicesInfo, layout: Layout) -> bool:
    try:
        creds = read_credentials(layout)
    except ServiceError:
        return False
    return (
        processes.owns(info.s3.pid, _markers(layout, S3))
        and processes.owns(info.mlflow.pid, _markers(layout, MLFLOW))
        and health.s3_ready(info.s3_endpoint, creds)
        and health.mlflow_ready(info.mlflow_uri)
    )


def up(
    state_dir: Path = DEFAULT_STATE_DIR,
    *,
    s3_port: int | None = None,
    mlflow_port: int | None = None,
    timeout: float = 60,
) -> ServicesInfo:
    """Start SeaweedFS and MLflow on 127.0.0.1 (or return the healthy stack already running there)."""
    layout = Layout(Path(state_dir).resolve())
    existing = load_record(layout)
    if existing is not None:
        if _healthy(existing, layout):
            wanted = ((S3, s3_port, existing.s3.port), (MLFLOW, mlflow_port, existing.mlflow.port))
            for name, want, have in wanted:
                if want is not None and want != have:
                    raise ServiceError(f"{name} already runs on port {have}, not {want}; run `down` first")
            return existing
        _stop_recorded(existing, layout)  # half-alive or stale: clean up what is still ours

    # Fail on a missing dependency or a taken port before anything starts.
    if importlib.util.find_spec("boto3") is None:
        raise ServiceError("mlflow server needs `boto3` to store artifacts in S3: pip install boto3")
    if s3_port is not None:
        processes.require_free(s3_port, S3)
    if mlflow_port is not None:
        processes.require_free(mlflow_port, MLFLOW)
    if s3_port is not None and s3_port == mlflow_port:
        raise ServiceError(f"{S3} and {MLFLOW} cannot share port {s3_port}")

    layout.make_dirs()
    creds = load_or_create_credentials(layout)
    write_s3_identities(layout, creds)
    taken = {p for p in (s3_port, mlflow_port) if p is not None}
    picked = iter(processes.free_ports(len(_WEED_INTERNAL) + 2, exclude=taken))
    s3_port = s3_port if s3_port is not None else next(picked)
    mlflow_port = mlflow_port if mlflow_port is not None else next(picked)
    internal = {flag: next(picked) for flag in _WEED_INTERNAL}
    s3_endpoint = f"http://{HOST}:{s3_port}"
    mlflow_uri = f"http://{HOST}:{mlflow_port}"

    started: list[tuple[int, tuple[str, ...]]] = []
    try:
        weed_log = layout.log(S3)
        weed_cmd = weed_argv(layout, s3_port, internal)
        weed = processes.spawn(weed_cmd, weed_log, _child_env(None, None), layout.root)
        started.append((weed.pid, _markers(layout, S3)))
        processes.wait_until(
            lambda: health.s3_ready(s3_endpoint, creds), weed, timeout, "SeaweedFS S3", weed_log
        )
        health.ensure_bucket(s3_endpoint, creds, BUCKET)

        ml_log = layout.log(MLFLOW)
        ml_env = _child_env(s3_endpoint, creds) | MLFLOW_SERVER_ENV
        ml = processes.spawn(mlflow_argv(layout, mlflow_port, BUCKET), ml_log, ml_env, layout.root)
        started.append((ml.pid, _markers(layout, MLFLOW)))
        processes.wait_until(lambda: health.mlflow_ready(mlflow_uri), ml, timeout, "MLflow server", ml_log)
    except BaseException:
        for pid, markers in reversed(started):
            processes.stop(pid, markers)
        raise

    info = ServicesInfo(
        state_dir=layout.root,
        s3=ServiceRecord(S3, weed.pid, s3_port, s3_endpoint, str(weed_log), ports=internal),
        mlflow=ServiceRecord(MLFLOW, ml.pid, mlflow_port, mlflow_uri, str(ml_log)),
    )
    save_record(layout, info)
    return info


def _stop_recorded(info: ServicesInfo, layout: Layout) -> None:
    # MLflow first: it writes into S3, so the store goes last.
    processes.stop(info.mlflow.pid, _markers(layout, MLFLOW))
    processes.stop(info.s3.pid, _markers(layout, S3))


def down(state_dir: Path = DEFAULT_STATE_DIR) -> None:
    """Stop the recorded processes (only if they are still ours) and forget them; data is kept."""
    layout = Layout(Path(state_dir).resolve())
    info = load_record(layout)
    if info is not None:
        _stop_recorded(info, layout)
    layout.record.unlink(missing_ok=True)


def status(state_dir: Path = DEFAULT_STATE_DIR) -> ServicesStatus:
    layout = Layout(Path(state_dir).resolve())
    info = load_record(layout)
    if info is None:
        return ServicesStatus(
            layout.root,
            tuple(ServiceState(n, False, False, None, None, str(layout.log(n))) for n in (S3, MLFLOW)),
        )
    try:
        creds: Credentials | None = read_credentials(layout)
    except ServiceError:
        creds = None
    states = []
    for rec in (info.s3, info.mlflow):
        running = processes.owns(rec.pid, _markers(layout, rec.name))
        if not running:
            healthy = False
        elif rec.name == S3:
            healthy = creds is not None and health.s3_ready(rec.endpoint, creds)
        else:
            healthy = health.mlflow_ready(rec.endpoint)
        states.append(ServiceState(rec.name, running, healthy, rec.pid, rec.endpoint, rec.log))
    return ServicesStatus(layout.root, tuple(states))


class LocalServices:
    """The stack bound to one state folder: ``LocalServices(path).up()`` / ``.status()`` / ``.down()``."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.state_dir = Path(state_dir)

    def up(
        self, *, s3_port: int | None = None, mlflow_port: int | None = None, timeout: float = 60
    ) -> ServicesInfo:
        return up(self.state_dir, s3_port=s3_port, mlflow_port=mlflow_port, timeout=timeout)

    def down(self) -> None:
        down(self.state_dir)

    def status(self) -> ServicesStatus:
        return status(self.state_dir)
