"""The TrainJob API calls and the wait: create (or find) the TrainJob, watch it until ``Complete``.

`run_trainjob` deletes the TrainJob on ``Failed``, on timeout and on cancellation (KeyboardInterrupt, or the
SIGTERM KFP sends the launcher pod when the run is cancelled); see the package docstring for the Trainer
conditions it reads and why a found TrainJob is compared by its spec digest.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bockd.platform.kube.client import CustomResourceApi, condition, is_true
from bockd.platform.polling import poll_until
from bockd.platform.trainjob.spec import (
    ANNOTATION_SPEC,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    TrainJobError,
    TrainJobSpec,
    build_trainjob,
)

LOG = logging.getLogger("bockd.trainjob")

# Suspended (e.g. Kueue waiting for quota) is waited for like a running TrainJob: only these two end a wait.
COMPLETE, FAILED = "Complete", "Failed"
TRAINER_FLOOR = "2.2"  # runtimePatches and activeDeadlineSeconds


class TrainJobApi(CustomResourceApi):
    """Get, create and delete TrainJobs."""

    group, version, plural, kind, error = GROUP, VERSION, PLURAL, KIND, TrainJobError

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when one of that name exists already (HTTP 409)."""
        try:
            return super().create(namespace, body)
        except TrainJobError as e:
            if e.status == 409:
                return None
            if e.status == 400 and "unknown field" in e.api_message:
                raise TrainJobError(
                    f"{e} (the installed TrainJob CRD lacks a field bockd writes: runtimePatches and "
                    f"activeDeadlineSeconds need Kubeflow Trainer >= {TRAINER_FLOOR})",
                    status=e.status,
                    api_message=e.api_message,
                ) from e
            raise


@dataclass(frozen=True)
class TrainJobResult:
    name: str
    namespace: str
    created: bool  # False: an existing TrainJob (a retried step's first attempt) was watched
    reason: str
    message: str
    status: dict[str, Any]


def describe(obj: Mapping[str, Any] | None) -> str:
    """One line per state: the conditions (type=status reason) and the child jobs' counts."""
    status = (obj or {}).get("status") or {}
    parts = [
        f"{c.get('type')}={c.get('status')}" + (f" ({c['reason']})" if c.get("reason") else "")
        for c in status.get("conditions") or []
    ]
    for j in status.get("jobsStatus") or []:
        counts = ", ".join(
            f"{k} {j.get(k, 0)}" for k in ("active", "ready", "succeeded", "failed", "suspended")
        )
        parts.append(f"jobs {j.get('name')}: {counts}")
    return "; ".join(parts) or "no status yet"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (KFP cancelling the run kills the launcher pod) raises KeyboardInterrupt while waiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _delete_and_wait(api: TrainJobApi, spec: TrainJobSpec, deadline: float, poll_s: float) -> None:
    api.delete(spec.namespace, spec.name)
    gone = poll_until(lambda: api.get(spec.namespace, spec.name) is None, _left(deadline), poll_s)
    if not gone:
        raise TrainJobError(f"TrainJob {spec.namespace}/{spec.name} was not deleted in time")


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (monotonic clock), never negative: one deadline covers every wait."""
    return max(0.0, deadline - time.monotonic())


def run_trainjob(
    api: TrainJobApi,
    spec: TrainJobSpec,
    timeout_s: float = 24 * 3600,
    poll_s: float = 30,
    *,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
    crd_path: str | Path | None = None,
) -> TrainJobResult:
    """Create (or find) the TrainJob, wait for ``Complete``; delete it on failure, timeout or cancellation.

    ``on_poll`` is called with each object read while waiting (tests raise KeyboardInterrupt from it).
    """
    body = build_trainjob(spec, crd_path)
    where = f"TrainJob {spec.namespace}/{spec.name}"
    deadline = time.monotonic() + timeout_s
    with _sigterm_raises():
        try:
            obj = api.get(spec.namespace, spec.name)
            created = False
            if obj is not None and is_true(obj, FAILED):
                LOG.warning("%s failed before (%s); deleting it and starting again", where, describe(obj))
                _delete_and_wait(api, spec, deadline, poll_s)
                obj = None
            elif obj is not None:
                _check_same_spec(obj, body, where)
            if obj is None:
                obj = api.create(spec.namespace, body)
                created = obj is not None
                if created:
                    LOG.info(
                        "%s created: %d node(s) x %d process(es)", where, spec.num_nodes, spec.procs_per_node
                    )
                elif (raced := api.get(spec.namespace, spec.name)) is not None:  # made since our GET
                    _check_same_spec(raced, body, where)
            if not created:
                LOG.info("%s exists already (a retried step): watching it", where)
            return _wait(api, spec, created, deadline, timeout_s, poll_s, on_poll)
        except KeyboardInterrupt:
            LOG.warning("%s: cancelled; deleting it", where)
            api.delete(spec.namespace, spec.name)
            raise


def _check_same_spec(found: Mapping[str, Any], body: Mapping[str, Any], where: str) -> None:
    """A TrainJob of this name that another launch made (another config under the same run id) is not ours
    to watch: its result would pass for this run's."""
    theirs = ((found.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC)
    if theirs != body["metadata"]["annotations"][ANNOTATION_SPEC]:
        raise TrainJobError(
            f"{where} exists with another spec ({ANNOTATION_SPEC} {theirs or 'missing'}): another launch "
            "under the same pipeline run id? Wait for it or delete it "
            f"(kubectl -n {body['metadata']['namespace']} delete trainjob {body['metadata']['name']}), "
            "or use another run id"
        )


def _wait(
    api: TrainJobApi,
    spec: TrainJobSpec,
    created: bool,
    deadline: float,
    timeout_s: float,
    poll_s: float,
    on_poll: Callable[[dict[str, Any]], None] | None,
) -> TrainJobResult:
    where = f"TrainJob {spec.namespace}/{spec.name}"
    seen = [""]  # the last state, logged when it changes and quoted on a timeout

    def completed() -> TrainJobResult | None:
        obj = api.get(spec.namespace, spec.name)
        if obj is None:
            raise TrainJobError(f"{where} disappeared while waiting for it (deleted by someone else?)")
        state = describe(obj)
        if state != seen[0]:
            LOG.info("%s: %s", where, state)
            seen[0] = state
        if is_true(obj, COMPLETE):
            c = condition(obj, COMPLETE)
            status = obj.get("status") or {}
            return TrainJobResult(
                spec.name, spec.namespace, created, c.get("reason", ""), c.get("message", ""), status
            )
        if is_true(obj, FAILED):
            c = condition(obj, FAILED)
            api.delete(spec.namespace, spec.name)
            raise TrainJobError(
                f"{where} failed: reason {c.get('reason') or '?'}: {c.get('message') or 'no message'} "
                "(deleted; its pods' logs are gone with it, the MLflow run keeps the metrics so far)"
            )
        if on_poll is not None:
            on_poll(obj)
        return None

    result = poll_until(completed, _left(deadline), poll_s)
    if result is None:
        api.delete(spec.namespace, spec.name)
        raise TrainJobError(
            f"{where} did not complete within {timeout_s:g} s (deleted); last status: {seen[0]}"
        )
    return result
