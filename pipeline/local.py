"""``bockd pipeline run --local``: the real pipeline under kfp.local's SubprocessRunner on this machine.

The embedded services (SeaweedFS S3 + MLflow, ``bockd services``) play the cluster's object store and
registry; each task runs as a subprocess of a worker process whose (verbose) KFP output goes to a log
file, while this process prints one line per finished task and per training epoch. After the run, every
deployed student answers one real prediction and a summary table is printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bockd.errors import BockdError
from bockd.pipeline.parameters import RunParameters
from bockd.pipeline.records import CascadeEndpoint, CascadeRecord, Endpoint, Endpoints, Summary, SummaryRow

_TASK_LINE = re.compile(r"Task '([\w-]+)' finished with status (\w+)")  # matched once ANSI codes are gone
_TASK_START = re.compile(r"Executing task '[\w-]+'")
_TRACEBACK = "Traceback (most recent call last):"
_EPOCH_LINE = re.compile(r"\[(ensemble|baseline)\] (epoch (\d+)/(\d+) .*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LocalRunError(BockdError):
    """The local pipeline run failed; the message names the task and the log file."""


@dataclass(frozen=True)
class LocalRun:
    run_dir: Path
    log: Path
    outputs: dict[str, str]  # output name -> local path (dataset, report, summary, endpoints, cascade)

    def summary(self) -> list[SummaryRow]:
        return Summary.read(self.outputs["summary"]).rows

    def endpoints(self) -> list[Endpoint]:
        return Endpoints.read(self.outputs["endpoints"]).endpoints

    def cascade(self) -> CascadeRecord | None:
        """The cascade step's record (fitted or skipped); None for a run without that output."""
        return CascadeRecord.read(self.outputs["cascade"]) if "cascade" in self.outputs else None

    def cascade_endpoint(self) -> CascadeEndpoint | None:
        return Endpoints.read(self.outputs["endpoints"]).cascade


def _worker(request_path: str) -> int:
    """Runs in the child process: the pipeline under kfp.local, outputs written to result.json."""
    from kfp import local

    from bockd.pipeline.pipeline import PipelineSettings, build_pipeline

    request = json.loads(Path(request_path).read_text())
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=request["pipeline_root"],
        raise_on_error=True,
    )
    # No GPU node, no Kubernetes secrets: the tasks inherit this process's environment.
    settings = PipelineSettings(
        gpu=None, s3_secret=None, mlflow_secret=None, s3_endpoint=request["s3_endpoint"]
    )
    task = build_pipeline(settings)(**request["arguments"])
    outputs = {name: artifact.path for name, artifact in task.outputs.items()}
    Path(request["result"]).write_text(json.dumps(outputs))
    return 0


@dataclass
class _TaskOutput:
    """The running task's latest output lines (ANSI codes removed), to report its own error if it fails."""

    lines: deque[str] = field(default_factory=lambda: deque(maxlen=400))
    failure: tuple[str, str] | None = None  # (task, its error message)

    def feed(self, plain: str) -> None:
        if _TASK_START.search(plain):
            self.lines = deque(maxlen=400)
        else:
            self.lines.append(plain)

    def failed(self, task: str) -> None:
        if self.failure is None:  # the first failure is the cause; later ones follow from it
            self.failure = (task, exception_message(list(self.lines)) or "no error message (see the log)")


def exception_message(lines: list[str]) -> str | None:
    """The message of the last Python traceback in ``lines`` (``bockd.errors.DataError: text`` -> text;
    other exceptions keep their class name), without the traceback itself."""
    starts = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK]
    if not starts:
        return None
    indent = _indent(lines[starts[-1]])
    message = []
    for line in lines[starts[-1] + 1 :]:
        if line.strip() and _indent(line) < indent:
            break  # kfp indents a task's output: a line left of it is the runner's again
        if line.strip() and _indent(line) == indent:  # deeper lines are the frames
            message.append(line.strip())
    kind, sep, text = "\n".join(message).partition(": ")
    if not kind:
        return None
    if not sep:
        return kind
    return text if kind.startswith("bockd.") else f"{kind.rsplit('.', 1)[-1]}: {text}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _shown(epoch: int, total: int) -> bool:
    """About ten epoch lines per training on the terminal; the log file has every one."""
    return epoch == 1 or epoch == total or epoch % max(1, total // 10) == 0


def _follow(proc: subprocess.Popen[bytes], log: Path, out: TextIO) -> tuple[str, str] | None:
    """Print task and epoch lines from the worker's log until it exits; returns the first failed task and
    its error message, if any."""
    task = _TaskOutput()
    with open(log, encoding="utf-8", errors="replace") as f:
        while True:
            line = f.readline()
            if not line:
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
                continue
            plain = _ANSI.sub("", line.rstrip())
            task.feed(plain)
            if m := _TASK_LINE.search(plain):
                print(f"  task {m.group(1):<16} {m.group(2).lower()}", file=out, flush=True)
                if m.group(2) == "FAILURE":
                    task.failed(m.group(1))
            elif (m := _EPOCH_LINE.search(plain)) and _shown(int(m.group(3)), int(m.group(4))):
                print(f"    {m.group(1):<8} {m.group(2)}", file=out, flush=True)
    return task.failure


def failure_message(failure: tuple[str, str] | None, log: Path, returncode: int | None) -> str:
    """What a failed run tells the user: the failed task's own error (or the worker's) and the log."""
    if failure is not None:
        return f"task {failure[0]} failed: {failure[1]}\nfull log: {log}"
    lines = [_ANSI.sub("", line) for line in log.read_text(errors="replace").splitlines()]
    error = exception_message(lines) or f"exit status {returncode}"
    return f"the local pipeline run failed: {error}\nfull log: {log}"


def run_local(params: RunParameters, state_dir: Path, out: TextIO | None = None) -> LocalRun:
    """Services up, then the whole pipeline on this machine; returns where its outputs are."""
    out = out or sys.stdout  # looked up now: a default bound at import may be a closed capture by now
    from bockd.platform.services import up

    info = up(state_dir)
    env = {**os.environ, **info.env()}
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = (state_dir / "runs" / stamp).absolute()
    run_dir.mkdir(parents=True)
    request = {
        "pipeline_root": str(run_dir / "root"),
        "s3_endpoint": info.s3_endpoint,
        "arguments": params.arguments(),
        "result": str(run_dir / "result.json"),
    }
    (run_dir / "request.json").write_text(json.dumps(request, indent=2))
    log = run_dir / "pipeline.log"
    print(f"pipeline run {stamp}: log in {log}", file=out, flush=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bockd.pipeline.local", str(run_dir / "request.json")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            failure = _follow(proc, log, out)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    if proc.returncode != 0 or not (run_dir / "result.json").exists():
        raise LocalRunError(failure_message(failure, log, proc.returncode))
    outputs = json.loads((run_dir / "result.json").read_text())
    # KFP names the artifact file after the output ("report"); a copy with a suffix opens in a browser.
    report = run_dir / "report.html"
    shutil.copyfile(outputs["report"], report)
    outputs["report"] = str(report)
    return LocalRun(run_dir, log, outputs)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
