"""Process plumbing: free ports, spawning into a new session, ownership-checked stopping, waiting.

Ownership is read through psutil (a PID's command line and state, portably), never by hand from /proc.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import psutil

from bockd.platform.polling import poll_until
from bockd.platform.services.errors import ServiceError

HOST = "127.0.0.1"


def find_executable(name: str) -> str:
    """Prefer the script next to this interpreter (the venv's), then PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"cannot find the `{name}` executable next to {sys.executable} or on PATH")
    return found


def free_ports(count: int, exclude: Collection[int] = ()) -> list[int]:
    """Ask the kernel for distinct free ports. Sockets stay open until all are picked so none repeat."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
            port = s.getsockname()[1]
            # SeaweedFS would derive gRPC ports as http + 10000; we pass every port, but keep them < 65536.
            if port not in exclude and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def require_free(port: int, service: str) -> None:
    if not 0 < port < 65536:
        raise ServiceError(f"{service}: port {port} is not a valid TCP port")
    if not port_is_free(port):
        raise ServiceError(
            f"{service}: port {port} on {HOST} is already in use; stop what holds it or choose another port"
        )


def spawn(argv: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start a detached process group (so `down` can stop it and its workers from another process)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` ([] when there is no such process or it cannot be read)."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def owns(pid: int, markers: Sequence[str]) -> bool:
    """True if `pid` is alive and its command line still holds every marker (program name, state path).

    A PID recycled by the kernel for some other program must never be signalled; a zombie (exited, not yet
    reaped) is not alive.
    """
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        args = process.cmdline()
    except psutil.Error:  # gone, a zombie psutil saw first, or not ours to read
        return False
    joined = "\0".join(args)
    return bool(args) and all(m in joined for m in markers)


def stop(pid: int, markers: Sequence[str], timeout: float = 15.0) -> bool:
    """SIGTERM the process group of `pid`, SIGKILL it after `timeout`. Returns True if it was ours."""
    if not owns(pid, markers):
        return False

    def gone() -> bool:
        _reap(pid)
        return not owns(pid, markers)

    with contextlib.suppress(ProcessLookupError):
        # We started it with start_new_session, so its PGID is its PID; fall back to the PID alone.
        pgid = os.getpgid(pid)
        target = (os.killpg, pgid) if pgid == pid else (os.kill, pid)
        target[0](target[1], signal.SIGTERM)
        if not poll_until(gone, timeout, 0.1):
            target[0](target[1], signal.SIGKILL)
            poll_until(gone, math.inf, 0.05)  # SIGKILL cannot be refused
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    """If the process is our own child (started in this interpreter), collect it so it is not a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_until(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path
) -> None:
    """Poll ``check`` until it is true; `ServiceError` if ``proc`` exits first or ``timeout`` s pass."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with status {proc.returncode} while starting; see {log}")
        return check()

    if not poll_until(ready, timeout, 0.25):
        raise ServiceError(f"{what} was not healthy after {timeout:.0f} s; see {log}")
