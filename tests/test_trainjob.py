"""The multi-node launcher: the Kubeflow Trainer TrainJob bockd builds; how it is created, watched, deleted.

No Kubernetes API server (nor Trainer controller) can run here, so these tests use a TEST DOUBLE:
`FakeTrainer`, an HTTP server on 127.0.0.1 that answers exactly the API paths bockd uses
(``/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs[/{name}]``, GET/POST/DELETE) and behaves
like the API server, Trainer's webhooks and Trainer's controller as far as bockd depends on them (every rule
in its docstring, with its upstream source). The real Kubernetes client (``CustomObjectsApi``) talks to it
over HTTP. The end-to-end test also plays the training pods: on the way to Complete it runs the worker
entry in-process (RANK unset, rank 0) against the real local S3 and MLflow servers.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kube_api_double import (
    TRAINJOB_CRD,
    ApiRequest,
    CustomObjectDouble,
    Denied,
    client_configuration,
    k8s_status,
    not_allowed,
    serve_api,
    without,
)

from bockd.errors import BockdError, ConfigError
from bockd.platform.kube.crd import CrdValidationError, crd_schema, validate_against_crd
from bockd.platform.trainjob import (
    TrainJobApi,
    TrainJobError,
    TrainJobSpec,
    build_trainjob,
    describe,
    run_trainjob,
    trainjob_name,
)
from bockd.platform.trainjob.spec import GPU_RESOURCE, RUNTIME, WORKER_MODULE

CRD = TRAINJOB_CRD

NS = "kubeflow-user"
RUN_ID = "3f2a9c1e-7b4d-4e8a-9c2f-1a2b3c4d5e6f"
IMAGE = "ghcr.io/bockd/bockd-trainer:0.1.0"
REQUEST = f"s3://bockd-staging/{RUN_ID}/ensemble/request.json"
POLL = 0.01
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
_TIME = "2026-11-24T12:00:00Z"
# JobSet's terminal conditions, which Trainer copies (kubernetes-sigs/jobset pkg/constants)
COMPLETED = ("AllJobsCompleted", "jobset completed successfully")
FAILED_JOBS = ("FailedJobs", "jobset failed due to one or more job failures")


# ------------------------------------------------------------------------------------------ test double


def _condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _TIME}


@dataclass
class FakeTrainer(CustomObjectDouble):
    """Test double of the Kubernetes API server + Kubeflow Trainer 2.2 (no API server can run here).

    API server (kube_api_double): pruning or strict refusal of unknown fields, the CRD schema (422),
    webhook denials as 403 Status objects; ``schema`` may be an older CRD's (`without`: Trainer 2.1 has no
    runtimePatches nor activeDeadlineSeconds).

    Trainer's mutating webhook (kubeflow/trainer v2.2.0 pkg/webhooks/trainjob_webhook.go Default, L45-90):
    on create, each ``runtimePatches[]`` entry gets ``time`` (so the stored spec is not the one sent).
    Trainer's validating webhook ("validator.trainjob.trainer.kubeflow.org", L94-131):
    - the runtimeRef must name a runtime Trainer has ("unsupported runtime", L115-118);
    - torch plugin (plugins/torch/torch.go Validate L56-80): no torchrun-reserved ``PET_*`` env;
    - jobset plugin (plugins/jobset/jobset.go Validate L89-164): a domain-prefixed manager; patched
      replicated jobs and containers must exist in the runtime (torch-distributed: job ``node``, container
      ``node``, manifests/base/runtimes/torch_distributed.yaml); no env on the ``node`` container.

    Trainer's controller, one step per GET: no condition while the JobSet runs (there is no "Created"
    condition in Trainer 2.x; trainjob_types.go L57-65 defines Suspended, Complete and Failed), jobsStatus
    from the JobSet, then ``Complete``/``Failed`` copied from the JobSet's conditions (jobset.go Status
    L328-347).
    ``outcome``: ``complete`` (after ``complete_after`` GETs), ``fail`` (after as many, reason
    ``fail_reason``) or ``hang`` (running forever). ``on_complete`` runs once just before a job completes.
    """

    group, version, plural, kind = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
    webhook = "validator.trainjob.trainer.kubeflow.org"
    crd = TRAINJOB_CRD
    runtimes: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: {"torch-distributed": {"node": {"node"}}}  # job -> container names
    )
    outcome: str = "complete"
    complete_after: int = 3
    fail_reason: str = FAILED_JOBS[0]
    delete_status: int = 200  # another code: DELETE fails with it
    on_complete: Callable[[dict[str, Any]], None] | None = None
    _gets: dict[tuple[str, str], int] = field(default_factory=dict)

    def modify(self, request: ApiRequest, ns: str, name: str) -> tuple[int, dict[str, Any]]:
        if request.method != "DELETE":
            return 405, k8s_status(405, "only GET/DELETE of one object")
        if self.delete_status != 200:
            return self.delete_status, k8s_status(self.delete_status, "the API server could not delete it")
        del self.objects[ns, name]
        return 200, k8s_status(200, "deleted") | {"status": "Success"}

    def created(self, ns: str, name: str) -> None:
        self._gets[ns, name] = 0

    def default(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        for patch in obj["spec"].get("runtimePatches") or []:
            patch.setdefault("time", _TIME)

    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        ref = obj["spec"]["runtimeRef"]
        jobs = self.runtimes.get(ref["name"]) if ref.get("kind") == "ClusterTrainingRuntime" else None
        if jobs is None:
            raise Denied(f"unsupported runtime: {ref.get('kind')}/{ref['name']}")
        reserved = sorted(
            e["name"] for e in obj["spec"]["trainer"].get("env") or [] if _RESERVED.match(e["name"])
        )
        if reserved:
            raise Denied(
                f"spec.trainer.env: must not have reserved envs, invalid envs configured: {reserved}"
            )
        for patch in obj["spec"].get("runtimePatches") or []:
            _check_runtime_patch(patch, jobs)

    def put(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        """Store an object as if an earlier attempt had created it and the controller had got this far."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        self.objects[ns, name] = copy.deepcopy(obj) | {"status": copy.deepcopy(status)}
        self._gets[ns, name] = 1

    # -- the Trainer controller

    def reconcile(self, ns: str, name: str) -> None:
        obj = self.objects[ns, name]
        status = obj.setdefault("status", {})
        conditions = status.setdefault("conditions", [])
        if any(c["type"] in ("Complete", "Failed") for c in conditions):
            return
        self._gets[ns, name] += 1
        n = self._gets[ns, name]
        nodes = obj["spec"]["trainer"].get("numNodes", 1)
        running = {"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}
        status["jobsStatus"] = [running]
        if n >= 2:
            running["ready"] = nodes
        if self.outcome == "hang" or n < self.complete_after:
            pass
        elif self.outcome == "fail":
            running.update(active=0, ready=0, failed=1)
            conditions.append(_condition("Failed", self.fail_reason, FAILED_JOBS[1]))
        else:
            if self.on_complete is not None:
                self.on_complete(obj)
            running.update(active=0, ready=0, succeeded=1)
            conditions.append(_condition("Complete", *COMPLETED))
        if not conditions:
            del status["conditions"]
        try:  # the statuses this double makes up are ones the real CRD allows
            validate_against_crd(obj, CRD)
        except CrdValidationError as e:
            self.rejected.append(str(e))


_RESERVED = re.compile(
    r"^PET_(NNODES|NPROC_PER_NODE|NODE_RANK|MASTER_ADDR|MASTER_PORT)$"
)  # constants.go L287


def _check_runtime_patch(patch: dict[str, Any], jobs: dict[str, set[str]]) -> None:
    """The jobset plugin's rules for one runtimePatches entry (jobset.go Validate L127-161)."""
    where = "spec.runtimePatches"
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-A-Za-z0-9_./]+", patch["manager"]):
        raise Denied(f"{where}.manager: must be a domain-prefixed path")
    template = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
    for job in template.get("replicatedJobs") or []:
        if job["name"] not in jobs:
            raise Denied(
                f"{where}: must not have replicated job that doesn't exist in the runtime job template"
            )
        for c in job["template"]["spec"]["template"]["spec"].get("containers") or []:
            if c["name"] not in jobs[job["name"]]:
                raise Denied(
                    f"{where}: must not have container that doesn't exist in the runtime job {job['name']}"
                )
            if c.get("env") and c["name"] == "node":
                raise Denied(f"{where}: must not have envs for the node containers")


@pytest.fixture
def fake() -> Iterator[FakeTrainer]:
    """The test double of the API server + Trainer controller (no Kubernetes API server can run here)."""
    with serve_api(FakeTrainer()) as double:
        yield double
    assert not_allowed(double.requests) == [], "calls the pipeline's Role (manifests) does not allow"


@pytest.fixture
def api(fake: FakeTrainer) -> TrainJobApi:
    return TrainJobApi.from_config(client_configuration(fake))


def spec_for(**kwargs: Any) -> TrainJobSpec:
    options: dict[str, Any] = {
        "num_nodes": 2,
        "gpus_per_node": 4,
        "tolerations": [TOLERATION],
        "node_selector": SELECTOR,
        "env": {"BOCKD_S3_ENDPOINT": "http://minio-service.kubeflow:9000"},
    }
    return TrainJobSpec.for_run(RUN_ID, NS, IMAGE, REQUEST, **(options | kwargs))


def run(api: TrainJobApi, spec: TrainJobSpec, timeout_s: float = 10.0, **kwargs: Any) -> Any:
    return run_trainjob(api, spec, timeout_s=timeout_s, poll_s=POLL, crd_path=CRD, **kwargs)


def _pod_patch(obj: dict[str, Any]) -> dict[str, Any]:
    (patch,) = obj["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    return job["template"]["spec"]["template"]["spec"]


# ----------------------------------------------------------------------------------------- the resource


def test_built_trainjob_matches_the_crd_and_carries_the_settings() -> None:
    """No API server needed: the object validates against the Trainer CRD and holds every setting."""
    obj = build_trainjob(spec_for(), CRD)
    validate_against_crd(obj, CRD)
    assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and obj["kind"] == "TrainJob"
    assert obj["metadata"]["name"] == trainjob_name(RUN_ID) and obj["metadata"]["namespace"] == NS
    assert obj["metadata"]["annotations"]["bockd.io/pipeline-run-id"] == RUN_ID
    assert obj["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": RUNTIME,
    }
    trainer = obj["spec"]["trainer"]
    assert trainer["image"] == IMAGE
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"] == ["--module", WORKER_MODULE, "--request", REQUEST]
    assert WORKER_MODULE == "bockd.pipeline.trainjob_worker"  # torchrun --module runs it
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {GPU_RESOURCE: "4"},
    }
    env = {e["name"]: e for e in trainer["env"]}
    assert env["BOCKD_S3_ENDPOINT"]["value"] == "http://minio-service.kubeflow:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "bockd-s3", "key": key, "optional": False}},
        }
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "bockd-mlflow", "key": key, "optional": True}
    assert all("value" not in e for e in trainer["env"] if "valueFrom" in e)  # names of secrets, no values
    pod = _pod_patch(obj)
    assert pod["nodeSelector"] == SELECTOR
    assert pod["tolerations"] == [TOLERATION]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert pod["containers"] == [
        {"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    ]
    assert obj["spec"]["runtimePatches"][0]["manager"] == "bockd.io/launcher"


def test_cpu_nodes_and_no_secrets() -> None:
    """No API server needed: no GPUs gives one process per node and no GPU limit; secrets are optional."""
    obj = build_trainjob(spec_for(gpus_per_node=0, s3_secret=None, mlflow_secret=None, tolerations=()), CRD)
    trainer = obj["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 1 and "limits" not in trainer["resourcesPerNode"]
    assert all("valueFrom" not in e for e in trainer["env"])
    assert "tolerations" not in _pod_patch(obj)


def test_names_are_dns_1035_stable_and_distinct() -> None:
    """No API server needed: names fit the CRD's RFC 1035 rule, repeat per run id and differ between them."""
    a, b = trainjob_name(RUN_ID), trainjob_name(RUN_ID.replace("6f", "70"))
    assert a == trainjob_name(RUN_ID) and a != b
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", a) and len(a) <= 40
    assert trainjob_name("Run_42") == "bockd-run-42-ensemble"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_nodes": 0}, "num_nodes"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"memory_request": "lots"}, "memory_request"),
        ({"tolerations": [{"key": "x", "operator": "Sometimes"}]}, r"tolerations\[0\]"),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "hunter2"}}, "credentials"),
        ({"node_selector": {"gpu": 1}}, "node_selector"),
        ({"env": {"PET_MASTER_PORT": "29500"}}, "PET_MASTER_PORT"),  # the torch plugin's own
        ({"shm_size": "8 Gi"}, "shm_size"),
    ],
)
def test_bad_specs_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    """No API server needed: each bad setting fails with a ConfigError naming it."""
    with pytest.raises(ConfigError, match=message):
        spec_for(**kwargs)


# -------------------------------------------------------------------------------------------- waiting


def _logged_states(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bockd.trainjob" and ": " in r.getMessage()]


def test_create_wait_complete(fake: FakeTrainer, api: TrainJobApi, caplog: pytest.LogCaptureFixture) -> None:
    """Against the test double (no API server here): created once, watched, returns on Complete; each
    status change is logged once."""
    caplog.set_level(logging.INFO, logger="bockd.trainjob")
    fake.complete_after = 4
    spec = spec_for()
    result = run(api, spec)
    assert result.created and result.name == spec.name and result.reason == "AllJobsCompleted"
    assert len(fake.calls("POST")) == 1 and fake.calls("DELETE") == []
    assert fake.calls("POST")[0].path.endswith(f"/namespaces/{NS}/trainjobs")
    assert len(fake.calls("GET")) >= 4
    states = [m for m in _logged_states(caplog) if "jobs node" in m]
    assert len(states) == len(set(states))  # logged on change only, although read on every poll
    assert any("Complete=True (AllJobsCompleted)" in m for m in states)
    assert len(states) < len(fake.calls("GET"))
    assert (NS, spec.name) in fake.objects  # kept: its pods' logs stay readable


def test_failed_job_names_the_reason_and_is_deleted(fake: FakeTrainer, api: TrainJobApi) -> None:
    """Against the test double (no API server here): Failed raises a TrainJobError with the reason and
    message, and the TrainJob is deleted."""
    fake.outcome = "fail"
    spec = spec_for()
    with pytest.raises(TrainJobError, match=r"failed: reason FailedJobs: jobset failed due to one") as info:
        run(api, spec)
    assert isinstance(info.value, BockdError)
    (delete,) = fake.calls("DELETE")
    assert delete.path.endswith(f"/trainjobs/{spec.name}") and "propagationPolicy=Background" in delete.query
    assert (NS, spec.name) not in fake.objects


def test_timeout_deletes_the_job(fake: FakeTrainer, api: TrainJobApi) -> None:
    """Against the test double (no API server here): a job that never finishes is deleted at the timeout."""
    fake.outcome = "hang"
    spec = spec_for()
    with pytest.raises(TrainJobError, match=r"did not complete within 0\.05 s"):
        run(api, spec, timeout_s=0.05)
    assert len(fake.calls("DELETE")) == 1 and (NS, spec.name) not in fake.objects


def test_cancel_deletes_the_job_and_reraises(fake: FakeTrainer, api: TrainJobApi) -> None:
    """Against the test double (no API server here): a KeyboardInterrupt while waiting (raised from the poll
    hook, as a cancelled run would) deletes the TrainJob and propagates."""
    fake.outcome = "hang"
    polls = []

    def interrupt(obj: dict[str, Any]) -> None:
        polls.append(obj)
        if len(polls) == 3:
            raise KeyboardInterrupt

    spec = spec_for()
    with pytest.raises(KeyboardInterrupt):
        run(api, spec, on_poll=interrupt)
    assert len(fake.calls("DELETE")) == 1 and (NS, spec.name) not in fake.objects


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_sigterm_deletes_the_job_and_restores_the_handler(fake: FakeTrainer, api: TrainJobApi) -> None:
    """Against the test double (no API server here): SIGTERM (KFP cancelling the run stops the launcher pod
    so) while waiting deletes the TrainJob, surfaces as KeyboardInterrupt, and the old handler comes back."""
    fake.outcome = "hang"
    before = signal.getsignal(signal.SIGTERM)

    def terminate(obj: dict[str, Any]) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        run(api, spec_for(), on_poll=terminate)
    assert len(fake.calls("DELETE")) == 1 and fake.objects == {}
    assert signal.getsignal(signal.SIGTERM) is before


def _running() -> dict[str, Any]:
    jobs = [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}]
    return {"jobsStatus": jobs}


def test_existing_running_job_is_watched_not_recreated(fake: FakeTrainer, api: TrainJobApi) -> None:
    """Against the test double (no API server here): a retried step finds its first attempt's TrainJob
    running and waits for it, creating nothing."""
    spec = spec_for()
    fake.put(build_trainjob(spec), _running())
    result = run(api, spec)
    assert not result.created and result.reason == "AllJobsCompleted"
    assert fake.calls("POST") == [] and fake.calls("DELETE") == []


def test_existing_job_with_another_spec_is_refused(fake: FakeTrainer, api: TrainJobApi) -> None:
    """Against the test double (no API server here): a TrainJob of the same name that another launch made
    (another config under the same run id) is neither watched nor touched; the error says what to do."""
    fake.put(build_trainjob(spec_for(num_nodes=4)), _running())
    with pytest.raises(TrainJobError, match=rf"another spec .*kubectl -n {NS} delete trainjob"):
        run(api, spec_for())
    assert fake.calls("POST") == [] and fake.calls("DELETE") == []
    legacy = build_trainjob(spec_for())
    del legacy["metadata"]["annotations"]["bockd.io/spec-sha256"]
    fake.put(legacy, _running())
    with pytest.raises(TrainJobError, match="spec-sha256 missing"):
        run(api, spec_for())


def test_existing_failed_job_is_deleted_and_recreated(fake: FakeTrainer, api: TrainJobApi) -> None:
    """Against the test double (no API server here): a first attempt's TrainJob that already failed is
    deleted and a new one created (it resumes from the S3 checkpoint)."""
    spec = spec_for()
    status = _running() | {"conditions": [_condition("Failed", *FAILED_JOBS)]}
    fake.put(build_trainjob(spec), status)
    result = run(api, spec)
    assert result.created
    methods = [r.method for r in fake.requests]
    assert methods.index("DELETE") < methods.index("POST") and methods.count("POST") == 1


def test_trainer_before_2_2_is_named_not_pruned(api: TrainJobApi) -> None:
    """Against the test double with the TrainJob CRD of Trainer 2.1 (no runtimePatches, no
    activeDeadlineSeconds): under strict field validation the API server refuses the fields instead of
    dropping them (which would run the job without /dev/shm, node selector or deadline)."""
    old = without(
        without(crd_schema(CRD, "v1alpha1"), "spec", "runtimePatches"), "spec", "activeDeadlineSeconds"
    )
    with serve_api(FakeTrainer(schema=old)) as fake:
        api = TrainJobApi.from_config(client_configuration(fake))
        with pytest.raises(TrainJobError, match=r"HTTP 400 .*unknown field .*Kubeflow Trainer >= 2\.2"):
            run(api, spec_for(active_deadline_seconds=60))
        assert fake.objects == {} and fake.calls("POST")[0].params == {"fieldValidation": "Strict"}


def test_double_stamps_patch_times_and_a_retry_still_finds_its_job(
    fake: FakeTrainer, api: TrainJobApi
) -> None:
    """Against the test double: Trainer's defaulter writes runtimePatches[].time, so the stored spec is not
    the one sent; a retried launch still recognises its TrainJob (by the spec digest annotation)."""
    spec = spec_for()
    body = build_trainjob(spec)
    code, stored = fake.receive(
        ApiRequest("POST", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs", "", "", body)
    )
    assert code == 201 and stored["spec"]["runtimePatches"][0]["time"] == _TIME
    assert stored["spec"] != body["spec"]
    result = run(api, spec)
    assert not result.created and len(fake.calls("POST")) == 1


def test_webhook_denial_is_a_clear_error(fake: FakeTrainer, api: TrainJobApi) -> None:
    """Against the test double: a runtime without the ``node`` job (Trainer's jobset plugin refuses a patch
    on a job the runtime lacks) is answered 403 with the webhook's message."""
    fake.runtimes["torch-distributed"] = {"trainer": {"trainer"}}
    with pytest.raises(
        TrainJobError, match=r"HTTP 403 .*denied the request: .*replicated job that doesn't exist"
    ):
        run(api, spec_for())
    assert fake.objects == {}


def test_describe_lists_conditions_and_jobs() -> None:
    """No API server needed: the one-line summary that is logged on each change."""
    assert describe({}) == "no status yet"
    jobs = "jobs node: active 1, ready 1, succeeded 0, failed 0, suspended 0"
    assert describe({"status": _running()}) == jobs
    done = _running() | {"conditions": [_condition("Complete", *COMPLETED)]}
    assert describe({"status": done}) == f"Complete=True (AllJobsCompleted); {jobs}"


# ----------------------------------------------------------------------------------- end to end (one rank)


def test_train_distributed_end_to_end_with_one_rank(
    fake: FakeTrainer, api: TrainJobApi, mlflow_stack: Any, digits: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """Real local S3 + MLflow; the Kubernetes API and Trainer controller are the test double, which plays the
    training pod by running the worker entry in-process (RANK unset: rank 0) before reporting Complete.
    The Model folder that comes back has train_ensemble's layout, and the MLflow run id is rank 0's."""
    from mlflow import MlflowClient

    from bockd.config import build_config
    from bockd.engine import HISTORY, MODEL_CONFIG, SUMMARY, WEIGHTS
    from bockd.pipeline import trainjob_worker
    from bockd.platform.s3 import client
    from bockd.platform.trainjob import train_distributed

    monkeypatch.delenv("RANK", raising=False)
    minio = client()
    if not minio.bucket_exists("bockd-staging"):
        minio.make_bucket("bockd-staging")
    data_dir = tmp_path / "dataset"
    digits.save(data_dir)
    config = {
        "data": {"dataset": "digits"},
        "model": {"arch": "resnet20", "num_students": 2},
        "epochs": 1,
        "batch_size": 64,
        "runtime": {"progress": "off"},
    }
    raw = build_config("smoke", config).to_dict()
    launched: list[dict[str, Any]] = []

    def play_pods(obj: dict[str, Any]) -> None:
        launched.append(obj)
        assert trainjob_worker.main(obj["spec"]["trainer"]["args"][2:]) == 0

    fake.on_complete = play_pods
    out = tmp_path / "model"
    result = train_distributed(
        raw,
        data_dir,
        out,
        staging_uri="s3://bockd-staging/runs",
        image=IMAGE,
        namespace=NS,
        num_nodes=1,
        gpus_per_node=0,
        tracking_uri=mlflow_stack.mlflow_uri,
        experiment="bockd-trainjob-test",
        pipeline_run_id="run-e2e",
        tags={"kfp.run_id": "run-e2e"},
        api=api,
        poll_s=POLL,
        timeout_s=600,
        mlflow_secret=None,
    )
    assert len(launched) == 1 and len(fake.calls("POST")) == 1
    env = {e["name"]: e.get("value") for e in launched[0]["spec"]["trainer"]["env"]}
    assert env["BOCKD_S3_ENDPOINT"] == mlflow_stack.s3_endpoint
    assert result["students"] == [1, 2] and result["mlflow_run_id"]
    for name in (WEIGHTS, MODEL_CONFIG, HISTORY, SUMMARY):
        assert (out / name).is_file(), name
    for k in (1, 2):
        assert any((out / "students" / f"s{k}").iterdir())
    run_ = MlflowClient(mlflow_stack.mlflow_uri).get_run(result["mlflow_run_id"])
    assert run_.data.tags["kfp.run_id"] == "run-e2e"
    # The cluster stops it at the launcher's timeout even without the launcher; once the Model folder is
    # here, the finished TrainJob and the run's staging objects (dataset copy, request, outputs) are gone.
    assert launched[0]["spec"]["activeDeadlineSeconds"] == 600
    assert len(fake.calls("DELETE")) == 1 and fake.objects == {}
    assert _staged(minio, "runs/run-e2e/") == []


def _staged(minio: Any, prefix: str) -> list[str]:
    return sorted(o.object_name for o in minio.list_objects("bockd-staging", prefix=prefix, recursive=True))


def _launch_with_fake_rank0(fake: FakeTrainer, api: TrainJobApi, tmp_path: Path, **kwargs: Any) -> Any:
    """train_distributed with the double playing a rank 0 that trained instantly: it uploads a one-file
    Model folder and the result, as the worker does last (real local S3)."""
    from bockd.config import build_config
    from bockd.platform.s3 import client, put_json, upload_folder
    from bockd.platform.trainjob import train_distributed

    minio = client()
    if not minio.bucket_exists("bockd-staging"):
        minio.make_bucket("bockd-staging")
    stage = "s3://bockd-staging/runs/run-keep/ensemble"
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "digits.npz").write_bytes(b"data")
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "model.safetensors").write_bytes(b"weights")

    def rank0(obj: dict[str, Any]) -> None:
        upload_folder(tmp_path / "trained", f"{stage}/model/")
        put_json(f"{stage}/result.json", {"students": [1], "mlflow_run_id": "r1", "final": {}})

    fake.on_complete = rank0
    raw = build_config("smoke", {"data": {"dataset": "digits"}}).to_dict()
    result = train_distributed(
        raw,
        tmp_path / "dataset",
        tmp_path / "model",
        staging_uri="s3://bockd-staging/runs",
        image=IMAGE,
        namespace=NS,
        pipeline_run_id="run-keep",
        api=api,
        poll_s=POLL,
        timeout_s=60,
        mlflow_secret=None,
        **kwargs,
    )
    assert result["students"] == [1]
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights"
    return minio


def test_cleanup_off_keeps_the_trainjob_and_staging(
    fake: FakeTrainer, api: TrainJobApi, mlflow_stack: Any, tmp_path: Path
) -> None:
    minio = _launch_with_fake_rank0(fake, api, tmp_path, cleanup=False)
    assert fake.calls("DELETE") == [] and len(fake.objects) == 1
    assert _staged(minio, "runs/run-keep/") == [
        "runs/run-keep/ensemble/dataset/digits.npz",
        "runs/run-keep/ensemble/model/model.safetensors",
        "runs/run-keep/ensemble/request.json",
        "runs/run-keep/ensemble/result.json",
    ]


def test_a_failed_cleanup_warns_and_keeps_the_result(
    fake: FakeTrainer, api: TrainJobApi, mlflow_stack: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.delete_status = 500
    with caplog.at_level(logging.WARNING, logger="bockd.trainjob"):
        minio = _launch_with_fake_rank0(fake, api, tmp_path)
    assert len(fake.calls("DELETE")) == 1 and len(fake.objects) == 1
    assert "cleanup after TrainJob" in caplog.text and "HTTP 500" in caplog.text
    assert "runs/run-keep/ensemble/result.json" in _staged(minio, "runs/run-keep/")
