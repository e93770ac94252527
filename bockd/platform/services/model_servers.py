"""Local KServe model servers: ``python -m bockd.serving`` on 127.0.0.1 as a detached process, tracked by a
JSON record (what the deploy step does in place of an InferenceService on one machine).

``<state_dir>/<name>.json`` holds pid, port, url and model folders; ``<state_dir>/<name>.log`` the server's
output. Stopping signals the recorded PID only while its command line is still our server's, so a PID the
kernel has handed to another program is never signalled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bockd
from bockd.atomic import write_json
from bockd.platform.polling import poll_until
from bockd.platform.services import health, processes
from bockd.serving.errors import ServingError

HOST = "127.0.0.1"
RECORD_FORMAT = "bockd-serving/1"
MODULE = "bockd.serving"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # it ends up in a file name and URL paths


@dataclass(frozen=True)
class LocalEndpoint:
    name: str
    pid: int
    port: int
    url: str
    model_dirs: tuple[str, ...] = ()
    backend: str = "onnx"

    @property
    def v1_predict_url(self) -> str:
        return f"{self.url}/v1/models/{self.name}:predict"

    @property
    def v2_infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.name}/infer"

    @property
    def v2_metadata_url(self) -> str:
        return f"{self.url}/v2/models/{self.name}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/v2/models/{self.name}/ready"

    def to_record(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "name": self.name,
            "pid": self.pid,
            "port": self.port,
            "url": self.url,
            "model_dirs": list(self.model_dirs),
            "backend": self.backend,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> LocalEndpoint:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            port=int(data["port"]),
            url=str(data["url"]),
            model_dirs=tuple(str(d) for d in data.get("model_dirs", [])),
            backend=str(data.get("backend", "onnx")),
        )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ServingError(f"name: {name!r} must be letters, digits, '.', '_' or '-' (starting alphanumeric)")


def _record_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{name}.json"


def _log_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{name}.log"


def _markers(name: str) -> tuple[str, ...]:
    # cmdline args are joined with NUL by processes.owns: "--model_name\0<name>\0" matches the exact name.
    return (MODULE, f"--model_name\0{name}\0")


def _read_record(path: Path) -> LocalEndpoint | None:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != RECORD_FORMAT:
            return None
        return LocalEndpoint.from_record(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_record(path: Path, endpoint: LocalEndpoint) -> None:
    write_json(path, endpoint.to_record())  # atomic: a reader never sees half a record


def _alive(endpoint: LocalEndpoint) -> bool:
    return processes.owns(endpoint.pid, _markers(endpoint.name))


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def server_argv(model_dirs: list[Path], name: str, port: int, backend: str) -> list[str]:
    argv = [sys.executable, "-m", MODULE, "--model_name", name, "--backend", backend]
    argv += ["--host", HOST, "--http_port", str(port), "--enable_grpc", "false"]
    for d in model_dirs:
        argv += ["--model_dir", str(d)]
    return argv


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # The child must import this very bockd, whether installed or run from a checkout.
    root = str(Path(bockd.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def start_local_server(
    model_dirs: list[Path],
    name: str,
    state_dir: Path,
    port: int | None = None,
    backend: str = "onnx",
    timeout: float = 60,
) -> LocalEndpoint:
    """Start (or return the healthy already-running) server ``name``; wait until its model is ready."""
    _check_name(name)
    if not model_dirs:
        raise ServingError("model_dirs: give at least one exported student folder")
    dirs = [Path(d).resolve() for d in model_dirs]
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    record = _record_path(state_dir, name)
    existing = _read_record(record)
    if existing is not None:
        if _alive(existing) and health.http_ok(existing.ready_url):
            same = list(existing.model_dirs) == [str(d) for d in dirs] and existing.backend == backend
            if not same or (port is not None and port != existing.port):
                raise ServingError(
                    f"{name} already runs on port {existing.port} serving {list(existing.model_dirs)} "
                    f"({existing.backend}); stop it first to serve something else"
                )
            return existing
        stop_local_server(state_dir, name)  # stale or unhealthy: clean up what is still ours

    if port is None:
        port = processes.free_ports(1)[0]
    elif not 0 < port < 65536:
        raise ServingError(f"port {port} is not a valid TCP port")
    elif not processes.port_is_free(port):
        raise ServingError(f"port {port} on {HOST} is already in use; stop what holds it or choose another")

    log = _log_path(state_dir, name)
    log.unlink(missing_ok=True)  # the tail shown on failure must be this start's
    proc = processes.spawn(server_argv(dirs, name, port, backend), log, _child_env(), state_dir)
    endpoint = LocalEndpoint(name, proc.pid, port, f"http://{HOST}:{port}", tuple(map(str, dirs)), backend)
    try:
        _wait_ready(endpoint, proc, timeout, log)
        _write_record(record, endpoint)
    except BaseException:
        processes.stop(proc.pid, _markers(name))
        raise
    return endpoint


def _wait_ready(endpoint: LocalEndpoint, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise ServingError(
                f"model server {endpoint.name} exited with status {proc.returncode} while starting "
                f"(port {endpoint.port}); last lines of {log}:\n{_log_tail(log)}"
            )
        return health.http_ok(endpoint.ready_url)

    if not poll_until(ready, timeout, 0.2):
        raise ServingError(
            f"model server {endpoint.name} was not ready on port {endpoint.port} after {timeout:.0f} s; "
            f"last lines of {log}:\n{_log_tail(log)}"
        )


def stop_local_server(state_dir: Path, name: str, timeout: float = 15) -> bool:
    """Stop server ``name`` by its recorded PID and remove the record. True if a running server was stopped.

    The PID is signalled (SIGTERM, then SIGKILL after ``timeout``) only if its command line still is our
    server's; otherwise the record is stale and is just removed.
    """
    _check_name(name)
    record = _record_path(Path(state_dir), name)
    endpoint = _read_record(record)
    stopped = endpoint is not None and processes.stop(endpoint.pid, _markers(name), timeout=timeout)
    record.unlink(missing_ok=True)
    return stopped


def list_local_servers(state_dir: Path) -> list[LocalEndpoint]:
    """The recorded servers whose process is still running, by name."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    found = (_read_record(p) for p in sorted(state_dir.glob("*.json")))
    return [e for e in found if e is not None and _alive(e)]


def stop_all_local_servers(root: Path) -> list[str]:
    """Stop every server recorded in ``root`` or one folder below it (the deploy step keeps one folder
    per model version); returns the names stopped."""
    root = Path(root)
    stopped = []
    for folder in [root, *sorted(p for p in root.glob("*") if p.is_dir())] if root.is_dir() else []:
        for endpoint in list_local_servers(folder):
            if stop_local_server(folder, endpoint.name):
                stopped.append(endpoint.name)
    return stopped
