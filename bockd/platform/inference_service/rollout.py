"""Roll a model version out onto an InferenceService safely: canary, promotion, rollback on failure.

Rollout of a new version onto an ISVC that serves an older one (``deploy_inference_service``):

- Knative mode (legacy name ``Serverless``): patch the new predictor with ``canaryTrafficPercent: p``;
  wait until KServe reports a new revision (``status.components.predictor.latestCreatedRevision`` other than
  before the patch) that is ready (``latestReadyRevision`` equal to it) and takes p % of the traffic; promote
  by removing ``canaryTrafficPercent``; wait until the latest ready revision takes 100 %.
- Standard mode (legacy ``RawDeployment``, KServe >= 0.20 for ``spec.canary``): add a ``spec.canary`` entry
  named ``v<version>`` with p % (the canary carries no autoscaling fields: KServe's webhook refuses them,
  "canary uses fixed replicas"); wait for its ``status.canaryStatuses`` entry to be ready (KServe: the
  canary Deployment has an available replica); promote: ``predictor.name`` = the canary's name and the entry
  removed (its Deployment becomes the predictor's). Then, and for a rollout in one step, wait until the
  predictor's Deployment reflects the stored spec and has rolled out by kubectl's rule (the ISVC's own
  status stays Ready during a rolling update). On a KServe without ``spec.canary`` (< 0.20, the API server
  refuses the unknown field) the step rolls out in one step and logs that it did.
- ``status.observedGeneration`` is never compared with the ISVC's ``metadata.generation``: KServe copies it
  from the child (Knative Service or Deployment; kserve v0.20.0 ``inference_service_status.go`` L456, L635).
- Either mode: a canary only when the storageUri changes (the same files under a new version make no new
  revision for a percentage to point at): then one step.
- Failure (``Ready``/``PredictorReady`` False with a reason that is not a transient one, a Deployment past
  its progress deadline), a request the API server or an admission webhook refuses, or a timeout: the
  previous predictor is patched back (previous storageUri, no canary), waited for, and `DeployError` says
  what failed and that the previous version keeps serving. A refused first request changed nothing and is
  not rolled back.

The version that serves fully is the label ``bockd.io/model-version``; its storage URI the annotation
``bockd.io/stable-storage-uri``: a rollout interrupted half-way (canary patched, never promoted) is rolled
back to that URI, never to the half-rolled-out one. Deploying the version that already serves is a no-op.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from bockd.platform.inference_service.api import DeployError, check_service_account
from bockd.platform.inference_service.api import InferenceServiceApi as IsvcApi
from bockd.platform.inference_service.spec import (
    ANNOTATION_STABLE_URI,
    DEPLOYMENT_MODE_ANNOTATION,
    LABEL_VERSION,
    STANDARD,
    DeploySpec,
    build_canary,
    build_inference_service,
    build_metadata,
    build_predictor,
    canary_name,
    check_version,
    normalize_mode,
    serialize,
)
from bockd.platform.inference_service.status import (
    Failure,
    Judge,
    Refusal,
    canary_judge,
    knative_judge,
    predictor_of,
    predictor_status,
    standard_judge,
    status_of,
    summarize,
)
from bockd.platform.polling import poll_until

LOG = logging.getLogger("bockd.deploy")


class _RolloutFailed(Exception):
    def __init__(self, failure: Failure | None, summary: str) -> None:
        super().__init__(str(failure) if failure else f"timed out, last status: {summary}")
        self.failure = failure


def _judge_for(
    api: IsvcApi,
    spec: DeploySpec,
    before: dict[str, Any] | None,
    after: dict[str, Any],
    percent: int = 100,
) -> Judge:
    return knative_judge(before, after, percent) if spec.knative else standard_judge(api, spec.namespace)


def _wait(
    api: IsvcApi, spec: DeploySpec, judge: Judge, what: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """Poll until ``judge`` says done; `_RolloutFailed` on a failure it reports or on timeout."""
    seen = [""]  # the last status summary, logged when it changes and quoted on a timeout

    def done() -> dict[str, Any] | None:
        obj = api.get(spec.namespace, spec.name)
        if obj is None:
            raise DeployError(f"InferenceService {spec.namespace}/{spec.name} disappeared while deploying")
        summary = summarize(obj)
        if summary != seen[0]:
            LOG.info("%s/%s %s: %s", spec.namespace, spec.name, what, summary)
            seen[0] = summary
        verdict = judge(obj)
        if isinstance(verdict, Failure):
            raise _RolloutFailed(verdict, summary)
        return obj if verdict else None

    obj = poll_until(done, timeout_s, poll_s)
    if obj is None:
        raise _RolloutFailed(None, seen[0])
    return obj


def _patch(
    api: IsvcApi, spec: DeploySpec, patch: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the ISVC before, as stored after) a merge patch; a refused patch raises `_RolloutFailed`."""
    before = api.get(spec.namespace, spec.name)
    try:
        return before, api.patch(spec.namespace, spec.name, patch)
    except DeployError as e:
        if not e.refused:
            raise
        raise _RolloutFailed(Refusal("request", f"HTTP {e.status}", e.api_message), "") from e


# ---------------------------------------------------------------------------------------------- deploy


@dataclass(frozen=True)
class DeployResult:
    name: str
    namespace: str
    url: str
    model_version: str
    revision: str | None  # Knative: the latest ready revision; Standard: the predictor's name, if any
    canary: bool  # whether the rollout went through a canary step
    previous_version: str | None
    changed: bool  # False: the version already served, nothing was sent


def served_version(obj: dict[str, Any]) -> str | None:
    """The model version an ISVC fully serves (our label), or None for one bockd did not create."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_VERSION)


def _stable_storage_uri(obj: dict[str, Any]) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_STABLE_URI) or predictor_of(obj).get("model", {}).get("storageUri")


def _rollout_pending(obj: dict[str, Any]) -> bool:
    return predictor_of(obj).get("canaryTrafficPercent") is not None or bool(
        (obj.get("spec") or {}).get("canary")
    )


def deploy_inference_service(
    api: IsvcApi, spec: DeploySpec, model_version: str, timeout_s: float = 600, poll_s: float = 5
) -> DeployResult:
    """Create the ISVC, or roll ``model_version`` out onto it (canary, promotion; rollback on failure).

    Waits for each step up to ``timeout_s`` and returns the served URL. Raises `DeployError` when the new
    version fails; the previous version has then been restored and keeps serving.
    """
    version = check_version(model_version)
    check_service_account(api, spec)
    existing = api.get(spec.namespace, spec.name)
    if existing is None:
        return _create(api, spec, version, timeout_s, poll_s)
    _check_mode(existing, spec)
    previous = served_version(existing)
    current_uri = predictor_of(existing).get("model", {}).get("storageUri")
    if previous == version and current_uri == spec.storage_uri and not _rollout_pending(existing):
        LOG.info("%s/%s already serves version %s: nothing to do", spec.namespace, spec.name, version)
        judge = _judge_for(api, spec, existing, existing)
        obj = _wait_or_raise(api, spec, judge, "ready", timeout_s, poll_s, version)
        return _result(obj, spec, version, canary=False, previous=previous, changed=False)
    try:
        obj, canary = _roll_out(
            api, spec, version, timeout_s, poll_s, same_files=current_uri == spec.storage_uri
        )
    except _RolloutFailed as e:
        if isinstance(e.failure, Refusal) and _unchanged(api, spec, existing):
            raise _refused(spec, version, previous, existing, e.failure) from e
        raise _roll_back(api, spec, existing, timeout_s, poll_s, version, e) from e
    return _result(obj, spec, version, canary=canary, previous=previous, changed=True)


def _unchanged(api: IsvcApi, spec: DeploySpec, existing: dict[str, Any]) -> bool:
    """Whether the ISVC still has the spec and metadata it had before this rollout started."""
    now = api.get(spec.namespace, spec.name) or {}
    return now.get("spec") == existing.get("spec") and (now.get("metadata") or {}).get("labels") == (
        existing.get("metadata") or {}
    ).get("labels")


def _refused(
    spec: DeploySpec, version: str, previous: str | None, existing: dict[str, Any], refusal: Refusal
) -> DeployError:
    return DeployError(
        f"InferenceService {spec.namespace}/{spec.name}: version {version} ({spec.storage_uri}) failed: "
        f"{refusal}; nothing was changed, the previous version {previous or '(unlabelled)'} "
        f"({_stable_storage_uri(existing)}) keeps serving"
    )


def _create(api: IsvcApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float) -> DeployResult:
    body = build_inference_service(spec, version)
    LOG.info(
        "creating InferenceService %s/%s (version %s, %s)",
        spec.namespace,
        spec.name,
        version,
        spec.storage_uri,
    )
    stored = api.create(spec.namespace, body)
    obj = _wait_or_raise(api, spec, _judge_for(api, spec, None, stored), "create", timeout_s, poll_s, version)
    return _result(obj, spec, version, canary=False, previous=None, changed=True)


def _wait_or_raise(
    api: IsvcApi,
    spec: DeploySpec,
    judge: Judge,
    what: str,
    timeout_s: float,
    poll_s: float,
    version: str,
) -> dict[str, Any]:
    """Wait where there is no previous version to roll back to: a failure is the caller's error."""
    try:
        return _wait(api, spec, judge, what, timeout_s, poll_s)
    except _RolloutFailed as e:
        raise DeployError(
            f"InferenceService {spec.namespace}/{spec.name} (version {version}, {spec.storage_uri}) "
            f"did not become ready: {e}"
        ) from e


def _check_mode(existing: dict[str, Any], spec: DeploySpec) -> None:
    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    mode = annotations.get(DEPLOYMENT_MODE_ANNOTATION) or status_of(existing).get("deploymentMode")
    if mode and normalize_mode(mode) != spec.deployment_mode:
        # KServe's webhook refuses a change of mode (validateDeploymentMode); delete the ISVC to switch
        raise DeployError(
            f"InferenceService {spec.namespace}/{spec.name} runs in {mode} mode, not {spec.deployment_mode}: "
            f"KServe cannot change the mode of an existing InferenceService; delete it first"
        )


def _metadata_patch(spec: DeploySpec, version: str) -> dict[str, Any]:
    meta = serialize(build_metadata(spec, version))
    return {"labels": meta["labels"], "annotations": meta["annotations"]}


def _roll_out(
    api: IsvcApi,
    spec: DeploySpec,
    version: str,
    timeout_s: float,
    poll_s: float,
    same_files: bool,
) -> tuple[dict[str, Any], bool]:
    """The rollout steps of the mode; returns the final object and whether a canary step ran.

    A canary is used only when the model files change: with the same storageUri, Knative would make no
    new revision for the canary percentage to point at.
    """
    if spec.canary_traffic_percent is None or same_files:
        return _roll_out_one_step(api, spec, version, timeout_s, poll_s), False
    if spec.knative:
        return _roll_out_knative_canary(api, spec, version, timeout_s, poll_s), True
    return _roll_out_standard_canary(api, spec, version, timeout_s, poll_s)


def _roll_out_one_step(
    api: IsvcApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """Knative: a new revision takes all the traffic when ready; Standard: the Deployment's rolling update."""
    predictor = serialize(build_predictor(spec))
    predictor["canaryTrafficPercent"] = None  # a canary left by an interrupted rollout goes
    patch: dict[str, Any] = {"metadata": _metadata_patch(spec, version), "spec": {"predictor": predictor}}
    if not spec.knative:
        patch["spec"]["canary"] = None
    LOG.info("%s/%s: rolling out version %s in one step", spec.namespace, spec.name, version)
    before, after = _patch(api, spec, patch)
    return _wait(api, spec, _judge_for(api, spec, before, after), "rollout", timeout_s, poll_s)


def _roll_out_knative_canary(
    api: IsvcApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """New revision at p % (``canaryTrafficPercent``), then promoted by removing the percentage."""
    ns, name, p = spec.namespace, spec.name, spec.canary_traffic_percent
    assert p is not None
    LOG.info("%s/%s: canary of version %s with %d%% of the traffic", ns, name, version, p)
    predictor = serialize(build_predictor(spec, canary_traffic_percent=p))
    before, after = _patch(api, spec, {"spec": {"predictor": predictor}})
    _wait(api, spec, knative_judge(before, after, p), "canary", timeout_s, poll_s)
    LOG.info("%s/%s: promoting version %s to 100%%", ns, name, version)
    promote = {
        "metadata": _metadata_patch(spec, version),
        "spec": {"predictor": {"canaryTrafficPercent": None}},
    }
    before, after = _patch(api, spec, promote)
    return _wait(api, spec, knative_judge(before, after, 100), "promotion", timeout_s, poll_s)


def _canary_name(existing: dict[str, Any], version: str) -> str:
    """``v<version>``, unless the stable predictor already bears that name (the webhook refuses a canary
    named like it, validateCanarySpecs L212-214)."""
    name = canary_name(version)
    return f"{name}-r" if predictor_of(existing).get("name") == name else name


def _roll_out_standard_canary(
    api: IsvcApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float
) -> tuple[dict[str, Any], bool]:
    """A ``spec.canary`` entry at p %, then promoted: the predictor takes its name, the entry goes.

    The deployment-mode annotation travels with the canary: the webhook admits a canary only when it says
    exactly ``Standard`` (validateCanarySpecs L188-191), not the legacy ``RawDeployment``. A KServe without
    ``spec.canary`` (< 0.20: the API server refuses the unknown field) gets a rollout in one step.
    """
    ns, name = spec.namespace, spec.name
    canary = _canary_name(api.get(ns, name) or {}, version)
    LOG.info(
        "%s/%s: canary %s (version %s) with %d%% of the traffic", ns, name, canary, version,
        spec.canary_traffic_percent,
    )  # fmt: skip
    patch = {
        "metadata": {"annotations": {DEPLOYMENT_MODE_ANNOTATION: STANDARD}},
        "spec": {"canary": [build_canary(spec, canary)]},
    }
    try:
        _patch(api, spec, patch)
    except _RolloutFailed as e:
        if not _lacks_canary_field(e.failure):
            raise
        LOG.warning(
            "%s/%s: this KServe has no spec.canary (KServe < 0.20; the API server refused the field): "
            "rolling out version %s in one step (a rolling update of the Deployment, no canary)",
            ns, name, version,
        )  # fmt: skip
        return _roll_out_one_step(api, spec, version, timeout_s, poll_s), False
    _wait(api, spec, canary_judge(canary), "canary", timeout_s, poll_s)
    LOG.info("%s/%s: promoting canary %s (version %s)", ns, name, canary, version)
    predictor = serialize(build_predictor(spec, name=canary))
    predictor["canaryTrafficPercent"] = None
    promote = {"metadata": _metadata_patch(spec, version), "spec": {"predictor": predictor, "canary": None}}
    before, after = _patch(api, spec, promote)
    return _wait(api, spec, _judge_for(api, spec, before, after), "promotion", timeout_s, poll_s), True


def _lacks_canary_field(failure: Failure | None) -> bool:
    """A strict-validation refusal of ``spec.canary``: HTTP 400 ``strict decoding error: unknown field
    "spec.canary"`` (the installed CRD predates KServe 0.20)."""
    return (
        isinstance(failure, Refusal)
        and failure.reason == "HTTP 400"
        and 'unknown field "spec.canary' in failure.message
    )


def rollback_patch(existing: dict[str, Any], knative: bool) -> dict[str, Any]:
    """The merge patch that restores ``existing``'s fully served version: its predictor, URI and metadata."""
    predictor = copy.deepcopy(predictor_of(existing))
    stable_uri = _stable_storage_uri(existing)
    if stable_uri:
        predictor.setdefault("model", {})["storageUri"] = stable_uri
    predictor["canaryTrafficPercent"] = None
    meta = existing.get("metadata") or {}
    patch: dict[str, Any] = {
        "metadata": {"labels": meta.get("labels") or {}, "annotations": meta.get("annotations") or {}},
        "spec": {"predictor": predictor},
    }
    if not knative:
        patch["spec"]["canary"] = None
    return patch


def _roll_back(
    api: IsvcApi,
    spec: DeploySpec,
    existing: dict[str, Any],
    timeout_s: float,
    poll_s: float,
    version: str,
    cause: _RolloutFailed,
) -> DeployError:
    """Patch the previous version back and wait for it; the error to raise says how that went."""
    ns, name = spec.namespace, spec.name
    previous = served_version(existing) or "(unlabelled)"
    what = str(cause.failure) if cause.failure else f"not ready after {timeout_s:g} s ({cause})"
    if cause.failure is None and not spec.knative:
        what += "; a Standard-mode canary that never reports a status: is KServe older than 0.20?"
    LOG.warning(
        "%s/%s: version %s failed (%s); rolling back to version %s", ns, name, version, what, previous
    )
    try:
        before, after = _patch(api, spec, rollback_patch(existing, spec.knative))
        _wait(api, spec, _judge_for(api, spec, before, after), "rollback", timeout_s, poll_s)
    except _RolloutFailed as e:
        return DeployError(
            f"InferenceService {ns}/{name}: version {version} ({spec.storage_uri}) failed: {what}; "
            f"the rollback to version {previous} ({_stable_storage_uri(existing)}) "
            f"did not become ready either: {e}"
        )
    return DeployError(
        f"InferenceService {ns}/{name}: version {version} ({spec.storage_uri}) failed: {what}; rolled back, "
        f"the previous version {previous} ({_stable_storage_uri(existing)}) keeps serving"
    )


def _result(
    obj: dict[str, Any], spec: DeploySpec, version: str, canary: bool, previous: str | None, changed: bool
) -> DeployResult:
    status = status_of(obj)
    url = status.get("url") or ((status.get("address") or {}).get("url")) or ""
    revision = predictor_status(obj).get("latestReadyRevision") or predictor_of(obj).get("name")
    return DeployResult(spec.name, spec.namespace, url, version, revision, canary, previous, changed)
