"""Cluster operations against a Kubeflow Pipelines (KFP) v2 API server: submit, schedule, list, pause.

Every function talks to the KFP v2beta1 REST API through ``kfp.Client`` (kfp 2.17.3). Errors are raised
as :class:`ClusterError`, which names the offending field and what was expected. The bearer token is read
from an environment variable and is never logged nor put into an error message.

Caching. A run or recurring run that references an uploaded pipeline version executes that version's
stored spec: ``kfp.Client`` applies ``enable_caching`` only to an inline ``pipeline_spec`` (it rewrites
each root-DAG task's ``cachingOptions.enableCache``) and silently ignores it for a version reference. So
:func:`schedule` writes the caching choice into the package *before* uploading it (every task of every
DAG, nested ones included); the version name carries the sha256 of those uploaded bytes, so uploading the
same package with the same caching choice reuses the version.

Versions. ``version="pin"`` sends ``pipeline_version_reference = {pipeline_id, pipeline_version_id}``;
``version="latest"`` sends ``{pipeline_id}`` only, which the v2beta1 API documents as "If unset, the latest
pipeline version is used". ``kfp.Client.create_recurring_run`` refuses a pipeline id without a version id
(``_create_job_config`` raises ``ValueError``), so the recurring run is created through the client's
generated REST binding (``client.recurring_runs``) with the same body ``create_recurring_run`` builds.

Cron. KFP's scheduled workflows parse cron with robfig/cron: six fields, *seconds first*. A five-field
expression there would silently mean ``sec min hour dom month`` (the day-of-week field is optional), so
:func:`validate_cron` reads five fields as standard Unix cron (``min hour dom month dow``) and prefixes
``"0 "`` (run at second 0); the six-field result is what gets sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import kfp
import kfp_server_api
import urllib3
import yaml

from bockd.errors import BockdError

__all__ = [
    "ClusterError",
    "RunInfo",
    "ScheduleInfo",
    "connect",
    "delete",
    "list_schedules",
    "pause",
    "resume",
    "schedule",
    "submit",
    "validate_cron",
]

log = logging.getLogger(__name__)

_EQUALS = 1  # kfp filter.proto Predicate.Operation.EQUALS
_PAGE_SIZE = 100
_PACKAGE_SUFFIXES = (".yaml", ".yml")
# kubeflow/pipelines 2.17.0 backend/src/apiserver/server/api_converter.go lines 2084-2086 (and the
# RecurringRun proto: "Range [1-10]"): the API server refuses any other max_concurrency.
_MAX_CONCURRENCY = 10
# validation/length.go lines 41, 47, 51 (KFP >= 2.15): the longest experiment, pipeline and pipeline
# version names the API server stores.
_MAX_EXPERIMENT_NAME = 128
_MAX_PIPELINE_NAME = 128
_MAX_VERSION_NAME = 127
_VERSION_SUFFIX = len("-sha256-") + 16  # the version name is <pipeline_name>-sha256-<16 hex>


class ClusterError(BockdError, RuntimeError):
    """A Kubeflow Pipelines request is invalid, was refused, or the API server cannot be reached."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """One submitted run."""

    run_id: str
    name: str
    experiment_id: str
    url: str  # the run's page in the KFP UI


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
    """One recurring run (a KFP schedule)."""

    id: str
    name: str
    cron: str | None  # None for an interval (periodic) schedule
    enabled: bool
    status: str  # ENABLED / DISABLED / STATUS_UNSPECIFIED, as the server reports it
    experiment_id: str | None
    pipeline_id: str | None
    pipeline_version_id: str | None  # None: the pipeline's latest version runs
    max_concurrency: int
    no_catchup: bool


# ---------------------------------------------------------------------------------------------- cron

_CRON_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 6),
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1
    )
}
_DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_NAMES = {"month": _MONTHS, "day-of-week": _DAYS}
_DESCRIPTORS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_GO_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+")
_GO_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_EXPECTED = (
    "6 space-separated fields 'second minute hour day-of-month month day-of-week' (robfig/cron, e.g. "
    "'0 0 3 * * *'), 5 standard fields 'minute hour day-of-month month day-of-week' (sent with '0 ' "
    "prefixed), or a descriptor (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly, "
    "@every <duration> such as '@every 1h30m')"
)


def _cron_error(expr: str, detail: str) -> ClusterError:
    return ClusterError(f"cron: {expr!r} is not a valid schedule: {detail}; expected {_EXPECTED}")


def _cron_value(expr: str, field: str, token: str, lo: int, hi: int) -> int:
    names = _NAMES.get(field, {})
    if token.lower() in names:
        return names[token.lower()]
    if not token.isdigit():
        allowed = f"a number {lo}-{hi}" + (f" or a name ({', '.join(names)})" if names else "")
        raise _cron_error(expr, f"{field} field: {token!r} is not {allowed}")
    value = int(token)
    if not lo <= value <= hi:
        raise _cron_error(expr, f"{field} field: {value} is out of range {lo}-{hi}")
    return value


def _check_cron_field(expr: str, field: str, text: str, lo: int, hi: int) -> None:
    for part in text.split(","):
        if not part:
            raise _cron_error(expr, f"{field} field {text!r} has an empty list item")
        base, slash, step = part.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            raise _cron_error(expr, f"{field} field: step {step!r} in {part!r} must be a positive integer")
        if base == "?":
            if field not in ("day-of-month", "day-of-week") or slash:
                raise _cron_error(
                    expr, f"{field} field: '?' is only allowed alone in day-of-month/day-of-week"
                )
            continue
        if base == "*":
            continue
        start, dash, end = base.partition("-")
        first = _cron_value(expr, field, start, lo, hi)
        if dash:
            last = _cron_value(expr, field, end, lo, hi)
            if first > last:
                raise _cron_error(expr, f"{field} field: range {base!r} runs backwards")


def validate_cron(expr: str) -> str:
    """Check a cron expression against KFP's parser (robfig/cron) and return the form to send.

    Accepted: six fields ``second minute hour day-of-month month day-of-week``; five standard Unix
    fields (``"0 "`` is prefixed, so ``"30 2 * * 1"`` becomes ``"0 30 2 * * 1"``); or a descriptor
    ``@yearly``/``@annually``/``@monthly``/``@weekly``/``@daily``/``@midnight``/``@hourly`` or
    ``@every <Go duration>`` (at least one second). Each field takes ``*``, numbers, ranges ``a-b``,
    steps ``*/n``, ``a/n``, ``a-b/n``, and lists ``a,b``; month and day-of-week also take three-letter
    names (``jan``, ``mon``), and ``?`` stands alone in day-of-month or day-of-week. Ranges: second and
    minute 0-59, hour 0-23, day-of-month 1-31, month 1-12, day-of-week 0-6 (0 = Sunday).

    Raises:
        ClusterError: naming the ``cron`` field and what was expected.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise _cron_error(str(expr), "it is empty")
    fields = expr.split()
    if fields[0].startswith("@"):
        descriptor = fields[0].lower()
        if descriptor == "@every":
            if len(fields) != 2:
                raise _cron_error(expr, "'@every' takes exactly one duration such as '1h' or '90m'")
            duration = fields[1]
            if not _GO_DURATION.fullmatch(duration):
                raise _cron_error(expr, f"{duration!r} is not a Go duration such as '1h', '30m' or '1h30m'")
            seconds = sum(
                float(num) * _GO_UNIT_SECONDS[unit]
                for num, unit in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", duration)
            )
            if seconds < 1:
                raise _cron_error(expr, f"'@every {duration}' is shorter than one second")
            return f"@every {duration}"
        if descriptor not in _DESCRIPTORS or len(fields) != 1:
            raise _cron_error(expr, f"unknown descriptor {expr.strip()!r}")
        return descriptor
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise _cron_error(expr, f"it has {len(fields)} fields")
    for text, (field, lo, hi) in zip(fields, _CRON_FIELDS, strict=True):
        _check_cron_field(expr, field, text, lo, hi)
    return " ".join(fields)


# ------------------------------------------------------------------------------------------- helpers


class _Secret:
    """Scrubs one secret value out of text that may reach a log or an error message."""

    def __init__(self, value: str | None) -> None:
        self.value = value or None

    @classmethod
    def of(cls, client: kfp.Client) -> _Secret:
        config = getattr(client, "_existing_config", None)
        return cls(config.api_key.get("authorization") if config is not None else None)

    def scrub(self, text: str) -> str:
        return text.replace(self.value, "***") if self.value else text


@contextlib.contextmanager
def _api(client: kfp.Client, action: str) -> Iterator[None]:
    """Turn kfp/HTTP failures into ClusterError; kfp's printed links go to the debug log instead."""
    secret = _Secret.of(client)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    except kfp_server_api.ApiException as exc:
        raw = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")
        body = raw[:500]
        message = f"{action}: the KFP API answered {exc.status} {exc.reason}: {body}".rstrip(": ")
        raise ClusterError(secret.scrub(message)) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ClusterError(secret.scrub(f"{action}: cannot reach the KFP API: {exc}")) from None
    except (ValueError, TimeoutError) as exc:
        raise ClusterError(secret.scrub(f"{action}: {exc}")) from None
    finally:
        for line in out.getvalue().splitlines():
            log.debug("kfp: %s", secret.scrub(line))


def _namespace(client: kfp.Client, namespace: str | None) -> str | None:
    """The namespace to send: the one given, else the one :func:`connect` was given, else none."""
    return namespace or client.get_user_namespace() or None


def _name_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": key, "stringValue": value}]})


def _read_package(package_path: str | os.PathLike[str]) -> tuple[Path, bytes]:
    path = Path(package_path)
    if path.suffix.lower() not in _PACKAGE_SUFFIXES:
        raise ClusterError(f"package_path: {str(path)!r} must be a compiled KFP pipeline YAML (.yaml/.yml)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ClusterError(f"package_path: cannot read {str(path)!r}: {exc.strerror}") from None
    return path, raw


def _with_caching(raw: bytes, package: Path, enable_caching: bool) -> bytes:
    """Return the package with ``cachingOptions.enableCache`` set on every task of every DAG."""
    try:
        docs = list(yaml.safe_load_all(raw))
    except yaml.YAMLError as exc:
        raise ClusterError(f"package_path: {str(package)!r} is not valid YAML: {exc}") from None
    spec = docs[0] if docs else None
    if not isinstance(spec, dict) or not isinstance(spec.get("root"), dict):
        raise ClusterError(f"package_path: {str(package)!r} is not a compiled KFP pipeline spec (no 'root')")
    dags = [spec["root"].get("dag") or {}]
    dags += [c["dag"] for c in (spec.get("components") or {}).values() if isinstance(c, dict) and "dag" in c]
    for dag in dags:
        for task in (dag.get("tasks") or {}).values():
            task.setdefault("cachingOptions", {})["enableCache"] = enable_caching
    return yaml.safe_dump_all(docs, sort_keys=True).encode()


@contextlib.contextmanager
def _package_file(path: Path, raw: bytes, enable_caching: bool | None) -> Iterator[tuple[Path, str]]:
    """Yield (file to send, sha256 of its bytes); with a caching choice, a rewritten temporary copy."""
    if enable_caching is None:
        yield path, hashlib.sha256(raw).hexdigest()
        return
    data = _with_caching(raw, path, enable_caching)
    with tempfile.TemporaryDirectory(prefix="bockd-kfp-") as tmp:
        out = Path(tmp) / f"{path.stem}.yaml"
        out.write_bytes(data)
        yield out, hashlib.sha256(data).hexdigest()


def _ui_link(client: kfp.Client, fragment: str) -> str:
    return f"{client._get_url_prefix()}/#/{fragment}"


def _experiment_id(client: kfp.Client, name: str, namespace: str | None, *, create: bool) -> str:
    if not name or not name.strip():
        raise ClusterError("experiment: must be a non-empty experiment name")
    if len(name) > _MAX_EXPERIMENT_NAME:
        raise ClusterError(f"experiment: {name!r} is longer than the API's {_MAX_EXPERIMENT_NAME} characters")
    namespace = _namespace(client, namespace)
    with _api(client, f"experiment {name!r}"):
        found = client.list_experiments(filter=_name_filter("display_name", name), namespace=namespace)
        experiments = found.experiments or []
        if len(experiments) > 1:
            raise ClusterError(f"experiment: {len(experiments)} experiments are named {name!r}; expected one")
        if experiments:
            return experiments[0].experiment_id
        if not create:
            raise ClusterError(f"experiment: no experiment named {name!r} exists")
        log.info("creating experiment %r", name)
        body = kfp_server_api.V2beta1Experiment(display_name=name, namespace=namespace)
        return client.experiments.experiment_service_create_experiment(experiment=body).experiment_id


def _pipeline_id(client: kfp.Client, name: str, namespace: str | None) -> str:
    namespace = _namespace(client, namespace)
    with _api(client, f"pipeline {name!r}"):
        found = client.list_pipelines(filter=_name_filter("display_name", name), namespace=namespace)
        pipelines = found.pipelines or []
        if len(pipelines) > 1:
            raise ClusterError(f"pipeline_name: {len(pipelines)} pipelines are named {name!r}; expected one")
        if pipelines:
            return pipelines[0].pipeline_id
        log.info("creating pipeline %r", name)
        body = kfp_server_api.V2beta1Pipeline(name=name, display_name=name, namespace=namespace)
        return client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id


def _version_id(client: kfp.Client, pipeline_id: str, version_name: str, package: Path) -> str:
    with _api(client, f"pipeline version {version_name!r}"):
        found = client.list_pipeline_versions(
            pipeline_id=pipeline_id, filter=_name_filter("display_name", version_name)
        )
        if found.pipeline_versions:
            log.info("reusing pipeline version %r", version_name)
            return found.pipeline_versions[0].pipeline_version_id
        log.info("uploading pipeline version %r", version_name)
        version = client.upload_pipeline_version(
            str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id
        )
        return version.pipeline_version_id


def _schedule_info(rr: kfp_server_api.V2beta1RecurringRun) -> ScheduleInfo:
    trigger = rr.trigger
    cron = trigger.cron_schedule.cron if trigger is not None and trigger.cron_schedule is not None else None
    ref = rr.pipeline_version_reference
    status = str(rr.status or "STATUS_UNSPECIFIED")
    enabled = status == "ENABLED" if rr.status else rr.mode == "ENABLE"
    return ScheduleInfo(
        id=rr.recurring_run_id,
        name=rr.display_name,
        cron=cron,
        enabled=enabled,
        status=status,
        experiment_id=rr.experiment_id,
        pipeline_id=ref.pipeline_id if ref is not None else None,
        pipeline_version_id=(ref.pipeline_version_id if ref is not None else None) or rr.pipeline_version_id,
        max_concurrency=int(rr.max_concurrency or 0),
        no_catchup=bool(rr.no_catchup),
    )


def _check_id(field: str, value: str) -> None:
    if not value or not value.strip() or "/" in value:
        raise ClusterError(f"{field}: {value!r} must be a non-empty KFP id")


# ------------------------------------------------------------------------------------------------ api


def connect(host: str, namespace: str | None = None, token_env: str = "KFP_TOKEN") -> kfp.Client:
    """Return a ``kfp.Client`` for the KFP API at ``host`` (``http(s)://...``).

    The bearer token is read from the environment variable ``token_env``; when it is unset or empty no
    ``Authorization`` header is sent. ``namespace`` is the Kubeflow profile namespace of a multi-user
    deployment (``None`` for single-user). Without a namespace kfp asks ``GET /apis/v2beta1/healthz``
    whether the deployment is multi-user.
    """
    if not host or not re.match(r"^https?://[^/\s]+", host):
        raise ClusterError(f"host: {host!r} must be the KFP API URL, e.g. 'http://localhost:8888'")
    if not token_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token_env):
        raise ClusterError(f"token_env: {token_env!r} must be an environment variable name")
    token = os.environ.get(token_env, "").strip() or None
    log.info(
        "connecting to KFP at %s (namespace %s, %s)",
        host,
        namespace or "-",
        f"bearer token from ${token_env}" if token else f"no token: ${token_env} is unset",
    )
    kwargs: dict[str, Any] = {"host": host, "existing_token": token}
    if namespace:
        kwargs["namespace"] = namespace
    secret = _Secret(token)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"kfp\.client")
            client = kfp.Client(**kwargs)
    except kfp_server_api.ApiException as exc:
        raise ClusterError(
            secret.scrub(f"host: KFP API at {host} answered {exc.status} {exc.reason}")
        ) from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
        raise ClusterError(secret.scrub(f"host: cannot reach the KFP API at {host}: {exc}")) from None
    if namespace:
        # kfp treats namespace="kubeflow" as "unset"; make the choice explicit either way.
        client._context_setting["namespace"] = namespace
    return client


def submit(
    client: kfp.Client,
    package_path: str | os.PathLike[str],
    *,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    namespace: str | None = None,
    enable_caching: bool | None = None,
) -> RunInfo:
    """Start one run of a compiled pipeline package in ``experiment`` (created when missing).

    ``params`` become ``runtime_config.parameters``. ``enable_caching`` ``None`` keeps the compiled
    per-task choices; ``True``/``False`` overrides every task.
    """
    path, raw = _read_package(package_path)
    if not run_name or not run_name.strip():
        raise ClusterError("run_name: must be a non-empty run name")
    if not isinstance(params, dict):
        raise ClusterError(f"params: expected a dict of pipeline parameters, got {type(params).__name__}")
    with _package_file(path, raw, enable_caching) as (package, _digest):
        experiment_id = _experiment_id(client, experiment, namespace, create=True)
        with _api(client, f"run {run_name!r}"):
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=dict(params),
                run_name=run_name,
                experiment_id=experiment_id,
                namespace=namespace,
            )
    run_id = result.run_id
    log.info("submitted run %r (%s) in experiment %r", run_name, run_id, experiment)
    return RunInfo(
        run_id=run_id,
        name=run_name,
        experiment_id=experiment_id,
        url=_ui_link(client, f"runs/details/{run_id}"),
    )


def schedule(
    client: kfp.Client,
    package_path: str | os.PathLike[str],
    *,
    experiment: str,
    job_name: str,
    cron: str,
    params: dict[str, Any],
    pipeline_name: str,
    version: Literal["pin", "latest"] = "pin",
    max_concurrency: int = 1,
    no_catchup: bool = True,
    enable_caching: bool | None = False,
    namespace: str | None = None,
) -> ScheduleInfo:
    """Upload the package as a version of ``pipeline_name`` and create a recurring run of it.

    The pipeline is found by name or created; the version is named ``<pipeline_name>-sha256-<16 hex>``
    after the uploaded bytes, so scheduling the same package again reuses that version. ``version="pin"``
    runs exactly that version forever; ``"latest"`` references the pipeline only and KFP runs its newest
    version at each trigger. ``enable_caching`` is written into the uploaded package (see the module
    docstring); ``None`` keeps the compiled per-task choices.
    """
    cron_expr = validate_cron(cron)
    path, raw = _read_package(package_path)
    if version not in ("pin", "latest"):
        raise ClusterError(f"version: {version!r} must be 'pin' or 'latest'")
    if not job_name or not job_name.strip():
        raise ClusterError("job_name: must be a non-empty schedule name")
    if not pipeline_name or not pipeline_name.strip():
        raise ClusterError("pipeline_name: must be a non-empty pipeline name")
    longest = min(_MAX_PIPELINE_NAME, _MAX_VERSION_NAME - _VERSION_SUFFIX)
    if len(pipeline_name) > longest:
        raise ClusterError(
            f"pipeline_name: at most {longest} characters (its versions add '-sha256-<16 hex>' and the API "
            f"keeps {_MAX_VERSION_NAME}), got {len(pipeline_name)}"
        )
    if (
        isinstance(max_concurrency, bool)
        or not isinstance(max_concurrency, int)
        or not 1 <= max_concurrency <= _MAX_CONCURRENCY
    ):
        raise ClusterError(f"max_concurrency: {max_concurrency!r} must be an integer 1..{_MAX_CONCURRENCY}")
    if not isinstance(params, dict):
        raise ClusterError(f"params: expected a dict of pipeline parameters, got {type(params).__name__}")

    with _package_file(path, raw, enable_caching) as (package, digest):
        experiment_id = _experiment_id(client, experiment, namespace, create=True)
        pipeline_id = _pipeline_id(client, pipeline_name, namespace)
        version_id = _version_id(client, pipeline_id, f"{pipeline_name}-sha256-{digest[:16]}", package)

    reference = kfp_server_api.V2beta1PipelineVersionReference(
        pipeline_id=pipeline_id, pipeline_version_id=version_id if version == "pin" else None
    )
    body = kfp_server_api.V2beta1RecurringRun(
        display_name=job_name,
        experiment_id=experiment_id,
        pipeline_version_reference=reference,
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=dict(params)),
        trigger=kfp_server_api.V2beta1Trigger(
            cron_schedule=kfp_server_api.V2beta1CronSchedule(cron=cron_expr)
        ),
        max_concurrency=str(max_concurrency),
        no_catchup=no_catchup,
        mode=kfp_server_api.RecurringRunMode.ENABLE,
    )
    with _api(client, f"schedule {job_name!r}"):
        created = client.recurring_runs.recurring_run_service_create_recurring_run(recurring_run=body)
    log.info(
        "scheduled %r (%s) with cron %r, version %s", job_name, created.recurring_run_id, cron_expr, version
    )
    return _schedule_info(created)


def list_schedules(
    client: kfp.Client, experiment: str | None = None, namespace: str | None = None
) -> list[ScheduleInfo]:
    """List the recurring runs of one experiment (by name), or all of the namespace's when it is None."""
    namespace = _namespace(client, namespace)
    experiment_id = (
        None if experiment is None else _experiment_id(client, experiment, namespace, create=False)
    )
    schedules: list[ScheduleInfo] = []
    token = ""
    with _api(client, "list schedules"):
        while True:
            page = client.list_recurring_runs(
                page_token=token, page_size=_PAGE_SIZE, experiment_id=experiment_id, namespace=namespace
            )
            schedules += [_schedule_info(rr) for rr in page.recurring_runs or []]
            token = page.next_page_token or ""
            if not token:
                return schedules


def pause(client: kfp.Client, recurring_run_id: str) -> None:
    """Disable a recurring run: no new runs start until :func:`resume`."""
    _check_id("recurring_run_id", recurring_run_id)
    with _api(client, f"pause schedule {recurring_run_id!r}"):
        client.disable_recurring_run(recurring_run_id)


def resume(client: kfp.Client, recurring_run_id: str) -> None:
    """Re-enable a paused recurring run."""
    _check_id("recurring_run_id", recurring_run_id)
    with _api(client, f"resume schedule {recurring_run_id!r}"):
        client.enable_recurring_run(recurring_run_id)


def delete(client: kfp.Client, recurring_run_id: str) -> None:
    """Delete a recurring run (runs it already started are kept)."""
    _check_id("recurring_run_id", recurring_run_id)
    with _api(client, f"delete schedule {recurring_run_id!r}"):
        client.delete_recurring_run(recurring_run_id)
