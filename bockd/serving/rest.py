"""The model server's HTTP layer: kserve's REST server with bounded inference routes and honest health.

kserve 0.21's ``RESTServer`` (kserve/protocol/rest/server.py) builds one FastAPI app with every V1/V2 route,
its exception handlers and its timing middleware. ``BockdRESTServer`` builds the same app (a fresh one per
server, not kserve's module-level ``app``) and changes what a production client would trip over:

* **Inference routes** (V1 ``:predict``, V2 ``/infer``). kserve's read the whole body, parse it and run the
  model on the event loop (v1_endpoints.py ``V1Endpoints.predict``, v2_endpoints.py ``V2Endpoints.infer``),
  so one big request froze health checks too. Here a request first waits for one of the model's
  ``max_concurrent_requests`` slots (its body unread meanwhile), its body is read up to the byte budget
  (413 past it, from Content-Length before reading when it is declared), then parsing, decoding, the
  network and encoding the answer all run in one of the model's executor threads.
* **Content types.** A V2 body is the binary tensor extension exactly when it carries
  ``Inference-Header-Content-Length``, and JSON otherwise, whatever Content-Type says (Triton's and
  KServe's HTTP clients send none with JSON; FastAPI then took it for bytes). V1 bodies are JSON (or a
  CloudEvent, as kserve's ``DataPlane.decode`` reads them); a Content-Type parameter such as
  ``charset=utf-8`` no longer turns them into raw bytes.
* **No model repository extension.** kserve's load/unload routes act on a ``ModelRepository`` that cannot
  load anything (model_repository.py ``ModelRepository.load`` is a stub), so one ``unload`` left the pod
  serving 404s while it reported ready. This server serves the models it was started with, like Triton's
  default ``--model-control-mode=none``: ``/v2/repository/...`` answers 404, the gRPC repository calls
  fail, and the server metadata no longer lists ``model_repository_extension``. A new model is a new
  revision (the deploy step's rollout), never a request.
* **Readiness** (``/v2/health/ready``) is the readiness of every model the server was started with, not
  a constant ``True`` (dataplane.py ``DataPlane.ready``); liveness stays the process's.
* **Errors.** A malformed request gets a 4xx whose message is short and never quotes the payload, logged
  as one line without traceback (kserve's handlers log every 400 with a traceback, errors.py); a 413
  closes the connection. An unexpected error is a 500 with a short message, logged once with its
  traceback frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import metadata
from typing import Any

import fastapi
import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer

from bockd.serving.model import ClassifierModel
from bockd.serving.preprocess import (
    RequestLimits,
    RequestTooLarge,
    clip,
    short,
    v2_request_from_binary,
    v2_request_from_json,
)

log = logging.getLogger("kserve.bockd")  # under kserve's logger: its handler and format
JSON = "application/json"
_CLOUDEVENT_JSON = "application/cloudevents+json"
_DRAIN_LIMIT = 256 << 20  # an over-budget body up to this is read and dropped so the client sees the 413
_MAX_MESSAGE = 500  # characters of an error message a response or log line carries


# -- readiness, metadata and the (absent) model repository extension -----------------------------------------


class RepositoryNotServed(ModelNotFound):
    """A model repository request (load, unload, index) to a server that serves a fixed set of models."""

    def __init__(self, served: Sequence[str]) -> None:
        self.reason = (
            f"the model repository extension is not served: this server serves the models it was started "
            f"with ({', '.join(served) or 'none'}); to change them, roll out a new revision"
        )


class ServingDataPlane(DataPlane):
    """kserve's DataPlane, ready when every model it was started with is, and honest server metadata."""

    def __init__(self, model_registry: ModelRepository) -> None:
        super().__init__(model_registry)
        self.expected: list[str] = []  # the models the server was started with

    async def ready(self) -> bool:
        if not self.expected:
            return False
        for name in self.expected:
            if not await self.model_registry.is_model_ready(name):
                return False
        return await super().ready()

    def metadata(self) -> dict[str, Any]:
        # kserve lists model_repository_extension unconditionally (dataplane.py DataPlane.metadata).
        return {**super().metadata(), "extensions": ["binary_tensor_data"]}


class FixedModelRepository(ModelRepositoryExtension):
    """The repository extension for gRPC callers: load and unload are refused, the index still lists."""

    def __init__(self, model_registry: ModelRepository, plane: ServingDataPlane) -> None:
        super().__init__(model_registry)
        self._plane = plane

    async def load(self, model_name: str) -> None:
        raise RepositoryNotServed(self._plane.expected)

    async def unload(self, model_name: str) -> None:
        raise RepositoryNotServed(self._plane.expected)


# -- request bodies ----------------------------------------------------------------------------------------


class Admission:
    """At most ``limit`` requests of one model past this point (reading their body, decoding, running).

    A request waiting here has not had its body read: uvicorn stops reading a connection once 64 KiB of a
    body nobody asked for are buffered (uvicorn/protocols/http/httptools_impl.py ``on_body``), so waiting
    costs no memory beyond that.
    """

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else None


async def refuse_declared(request: Request, limit: int, setting: str) -> None:
    """Before a request waits for a slot: refuse a compressed body, or one whose declared length is over
    ``limit``. Such a body is still read and dropped (up to 256 MiB, then the connection closes): a client
    sends all of it before it reads an answer, and should get to read the 413."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedEncoding(f"Content-Encoding {short(encoding)}: send the request body uncompressed")
    declared = _declared_length(request)
    if declared is None or declared <= limit:
        return
    if declared <= _DRAIN_LIMIT:
        async for _ in request.stream():
            pass
    raise RequestTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes ({setting})")


async def read_body(request: Request, limit: int, setting: str) -> bytes:
    """The request body, at most ``limit`` bytes; one found longer while it streams is read to its end
    and dropped (up to 256 MiB) before RequestTooLarge (naming ``setting``) is raised."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        else:
            chunks.clear()  # keep nothing; read on only to drop it
            if size > _DRAIN_LIMIT:
                break
    if size > limit:
        raise RequestTooLarge(f"request body of more than {limit} bytes is over the limit ({setting})")
    return b"".join(chunks)


def body_limit(limits: RequestLimits, binary: bool) -> tuple[int, str]:
    """(most bytes, the setting that says so) for a binary-extension body or a JSON one."""
    if binary:
        return limits.max_request_bytes, "max_request_bytes"
    if limits.max_json_bytes <= limits.max_request_bytes:
        return limits.max_json_bytes, "max_json_bytes"
    return limits.max_request_bytes, "max_request_bytes"


def _json_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers with which kserve's ``DataPlane.decode`` parses a V1 body as JSON (or a CloudEvent).

    kserve hands the raw bytes to the model for any Content-Type not in its list, compared with its
    parameters (dataplane.py ``DataPlane.decode``): ``application/json; charset=utf-8`` and a missing or
    form Content-Type (curl's default) were not parsed. V1 bodies are JSON: only the media type of a
    structured CloudEvent is kept.
    """
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return {**headers, "content-type": media if media == _CLOUDEVENT_JSON else JSON}


# -- the inference routes ------------------------------------------------------------------------------------

Answer = tuple[bytes, str, dict[str, str]]  # body, media type, headers


class InferenceRoutes:
    """V1 ``:predict`` and V2 ``/infer`` for the models of one ``ServingDataPlane``."""

    def __init__(self, plane: ServingDataPlane) -> None:
        self.plane = plane
        self.admissions: dict[str, Admission] = {}

    async def _model(self, name: str) -> ClassifierModel:
        model = self.plane.get_model_from_registry(name)  # ModelNotFound: 404
        if not await self.plane.model_ready(name, True):
            raise ModelNotReady(name)
        if not isinstance(model, ClassifierModel):
            raise ModelNotFound(name)
        return model

    def _admission(self, model: ClassifierModel) -> Admission:
        if model.name not in self.admissions:
            self.admissions[model.name] = Admission(model.limits.max_concurrent_requests)
        return self.admissions[model.name]

    async def v1_predict(self, model_name: str, request: Request) -> Response:
        return await self._serve(await self._model(model_name), request, self._v1, binary=False)

    async def v2_infer(self, model_name: str, request: Request, model_version: str | None = None) -> Response:
        if model_version:
            raise NotImplementedError("model versions are not supported; leave /versions/<v> out")
        binary = INFERENCE_CONTENT_LENGTH_HEADER in request.headers
        return await self._serve(await self._model(model_name), request, self._v2, binary=binary)

    async def _serve(
        self, model: ClassifierModel, request: Request, work: Callable[..., Answer], binary: bool
    ) -> Response:
        """Wait for a slot, read the body (within ``max_body_seconds``), answer in an executor thread."""
        limits = model.limits
        limit, setting = body_limit(limits, binary)
        await refuse_declared(request, limit, setting)
        async with self._admission(model).slot():
            try:
                async with asyncio.timeout(limits.max_body_seconds):
                    body = await read_body(request, limit, setting)
            except TimeoutError:  # a client that holds a slot without sending: give the slot back
                raise BodyTimeout(
                    f"the request body did not arrive within {limits.max_body_seconds} s (max_body_seconds)"
                ) from None
            return await self._run(model, work, body, dict(request.headers))

    async def repository(self, path: str) -> Response:
        raise RepositoryNotServed(self.plane.expected)

    async def explain(self, model_name: str) -> Response:
        # kserve's route parsed the whole body before its model said it has no explainer.
        raise NotImplementedError("this model server has no explainer")

    async def _run(
        self, model: ClassifierModel, work: Callable[..., Answer], body: bytes, headers: dict
    ) -> Response:
        loop = asyncio.get_running_loop()
        try:
            content, media, extra = await loop.run_in_executor(model.executor, work, model, body, headers)
        except (InvalidInput, ModelNotFound, ModelNotReady, NotImplementedError):
            raise
        except Exception as err:  # a bug, not the client's doing: a short 500, logged with its traceback
            raise InternalError(err) from err
        return Response(content, media_type=media, headers=extra)

    def _v1(self, model: ClassifierModel, body: bytes, headers: dict[str, str]) -> Answer:
        headers = _json_headers(headers)
        request, attributes = self.plane.decode(body, headers)
        response, response_headers = model.infer_sync(request, headers)
        response, encoded_headers = self.plane.encode(model.name, response, headers, attributes)
        return _answer(response, {**response_headers, **encoded_headers})

    def _v2(self, model: ClassifierModel, body: bytes, headers: dict[str, str]) -> Answer:
        length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
        if length is None:
            request = v2_request_from_json(body, model.name, model.limits)
        else:
            request = v2_request_from_binary(body, length, model.name, model.limits)
        response, response_headers = model.infer_sync(request, headers)
        response, encoded_headers = self.plane.encode(model.name, response, headers, {})
        return _answer(response, {**response_headers, **encoded_headers})


def _answer(response: Any, headers: dict[str, str]) -> Answer:
    """kserve's encoded response -> (body, media type, headers); bytes are the binary extension's answer
    unless kserve named a media type (a CloudEvent's)."""
    media = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    headers = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "content-type")}
    if isinstance(response, (bytes, bytearray)):
        return bytes(response), media or "application/octet-stream", headers
    if isinstance(response, str):
        return response.encode(), media or JSON, headers
    return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY), media or JSON, headers


# -- errors -> answers ---------------------------------------------------------------------------------------


class UnsupportedEncoding(InvalidInput):
    """A request body in a Content-Encoding the server does not decode (HTTP 415)."""


class BodyTimeout(InvalidInput):
    """A request body that did not arrive in time (HTTP 408)."""


class InternalError(Exception):
    """An unexpected error while answering a request: the server's fault (500)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {clip(cause)}")
        self.cause = cause


def _cut(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "..."


def _where(request: Request) -> str:
    return f"{request.method} {short(request.url.path)}"


def refuse(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A client error: ``{"error": message}`` (message cut short) and one log line, no traceback."""
    message = _cut(message)
    log.warning("%s -> %d: %s", _where(request), status, message)
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
    close = {"Connection": "close"}  # the rest of an unread body cannot be reused
    if isinstance(exc, RequestTooLarge):
        return refuse(request, 413, str(exc), close)
    if isinstance(exc, BodyTimeout):
        return refuse(request, 408, str(exc), close)
    return refuse(request, 415 if isinstance(exc, UnsupportedEncoding) else 400, str(exc))


async def not_found(request: Request, exc: Exception) -> JSONResponse:
    return refuse(request, 404, str(exc))


async def unavailable(request: Request, exc: Exception) -> JSONResponse:
    return refuse(request, 503, str(exc))


async def not_implemented(request: Request, exc: Exception) -> JSONResponse:
    return refuse(request, 501, str(exc))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body FastAPI could not validate: 400 with where and why (FastAPI says 422), never the input."""
    reasons = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        reasons.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return refuse(request, 400, "invalid request: " + "; ".join(reasons))


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    cause = exc.cause if isinstance(exc, InternalError) else exc
    message = _cut(f"internal error ({type(cause).__name__}: {clip(cause)}); the server log has more")
    frames = "".join(traceback.format_tb(cause.__traceback__))
    log.error("%s -> 500: %s\n%s", _where(request), message, frames)  # frames, not the exception's text
    return JSONResponse(status_code=500, content={"error": message})


ERROR_HANDLERS: dict[type[Exception], Callable[..., Any]] = {
    InvalidInput: invalid_input,  # its subclasses too (413, 408, 415): told apart inside
    ModelNotFound: not_found,  # RepositoryNotServed too
    ModelNotReady: unavailable,
    ServerNotReady: unavailable,
    ServerNotLive: unavailable,
    NotImplementedError: not_implemented,
    UnsupportedProtocol: not_implemented,
    RequestValidationError: validation_error,
    InferenceError: internal_error,
    InternalError: internal_error,
}


# -- the app and the server ----------------------------------------------------------------------------------


def new_app(enable_docs_url: bool = False) -> fastapi.FastAPI:
    """A FastAPI app like kserve's module-level one (kserve/model_server.py ``app``), new for each server;
    FastAPI's own JSON responses (kserve's ORJSONResponse default is deprecated in this FastAPI)."""
    return fastapi.FastAPI(
        title="KServe ModelServer (bockd)",
        version=metadata.version("kserve"),
        docs_url="/docs" if enable_docs_url else None,
        redoc_url=None,
    )


class BockdRESTServer(RESTServer):
    """kserve's RESTServer on ``app`` (an instance, bound to ``host``) with the routes and errors above."""

    def __init__(
        self,
        app: fastapi.FastAPI,
        plane: ServingDataPlane,
        repository: ModelRepositoryExtension,
        http_port: int,
        host: str,
        **options: Any,
    ) -> None:
        super().__init__(app, plane, repository, http_port, workers=1, **options)  # type: ignore[arg-type]
        self.config.host = host  # kserve hardcodes 0.0.0.0; uvicorn reads this when it binds
        self.app = app
        self.routes = InferenceRoutes(plane)

    def create_application(self) -> None:
        # kserve's imports its module-level app by name (server.py RESTServer.create_application).
        self._add_middlewares(self.app)
        self._register_endpoints(self.app)
        self._add_exception_handlers(self.app)

    def _register_endpoints(self, app: fastapi.FastAPI) -> None:
        # Ours first: a route matches in the order routes were added, so kserve's inference, explain and
        # repository routes of the same paths (registered after) are never reached.
        post = {"methods": ["POST"], "response_model": None, "include_in_schema": False}
        app.add_api_route("/v1/models/{model_name}:predict", self.routes.v1_predict, **post)
        app.add_api_route("/v1/models/{model_name}:explain", self.routes.explain, **post)
        app.add_api_route("/v2/models/{model_name}/infer", self.routes.v2_infer, **post)
        versioned = "/v2/models/{model_name}/versions/{model_version}/infer"
        app.add_api_route(versioned, self.routes.v2_infer, **post)
        any_method = {**post, "methods": ["GET", "POST", "PUT", "DELETE"]}
        app.add_api_route("/v2/repository/{path:path}", self.routes.repository, **any_method)
        super()._register_endpoints(app)

    def _add_exception_handlers(self, app: fastapi.FastAPI) -> None:
        super()._add_exception_handlers(app)
        for kind, handler in ERROR_HANDLERS.items():
            app.add_exception_handler(kind, handler)

    @property
    def admissions(self) -> dict[str, Admission]:
        return self.routes.admissions

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    @property
    def should_exit(self) -> bool:
        return bool(self._server.should_exit)

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._server.should_exit = value


def serving_plane(models: Sequence[Any]) -> tuple[ServingDataPlane, FixedModelRepository]:
    """A DataPlane (and repository extension) over ``models``, which must be loaded."""
    registry = ModelRepository()
    plane = ServingDataPlane(registry)
    for model in models:
        registry.update(model)
    plane.expected = [model.name for model in models]
    return plane, FixedModelRepository(registry, plane)


def build_rest_server(models: Sequence[Any], host: str, port: int, **options: Any) -> BockdRESTServer:
    """The REST server for loaded ``models`` on ``host:port``; ``await server.start()`` serves until
    ``server.should_exit`` is set (no signal handlers: it can run on any thread's event loop)."""
    plane, repository = serving_plane(models)
    return BockdRESTServer(new_app(), plane, repository, port, host, **options)
