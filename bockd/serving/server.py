"""The model-server process: kserve's standard arguments plus ours, and a ModelServer that can bind 127.0.0.1.

kserve 0.21's REST server hardcodes ``host="0.0.0.0"`` in its uvicorn config and its gRPC server listens on
``[::]``; there is no option for either. ``HostModelServer`` builds the same REST server kserve would and
sets the uvicorn config's host before it starts serving; gRPC is off by default here because it cannot be
bound to one interface.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Sequence
from typing import Any

import kserve
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.model import BaseKServeModel
from kserve.protocol.rest.server import RESTServer

from bockd.errors import BockdError
from bockd.serving.model import BACKENDS, DEFAULT_BACKEND, build_model

LOCAL_HOST = "127.0.0.1"
_ALL_INTERFACES = ("0.0.0.0", "::", "")


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A V2 body that is not an inference request at all: 400 with a readable reason (FastAPI says 422).

    kserve declares the V2 body as ``InferenceRequest | bytes``; the ``bytes`` alternative always fails too
    and only adds noise, so its errors are left out.
    """
    reasons = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "InferenceRequest")]
        if loc[:1] == ["bytes"]:
            continue
        reasons.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    message = "invalid inference request: " + "; ".join(reasons)
    return JSONResponse(status_code=400, content={"error": message})


class HostModelServer(kserve.ModelServer):
    """kserve's ModelServer, REST bound to ``host`` (kserve's own start() when host is all interfaces)."""

    def __init__(self, host: str = LOCAL_HOST, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host
        if host not in _ALL_INTERFACES and (self.enable_grpc or self.workers != 1):
            raise ValueError(
                f"--host {host}: kserve 0.21 binds gRPC and multi-worker REST on all interfaces; "
                "use --enable_grpc false --workers 1, or --host 0.0.0.0"
            )

    def start(self, models: list[BaseKServeModel]) -> None:
        # Every malformed request answers 400 {"error": ...}, also those FastAPI rejects before the model.
        kserve.model_server.app.add_exception_handler(RequestValidationError, validation_error_handler)
        if self.host in _ALL_INTERFACES:
            return super().start(models)
        # The single-worker, REST-only branch of ModelServer.start, with the bind address changed.
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )
        self._rest_server.config.host = self.host  # read by uvicorn when serve() binds
        self.servers.append(self._rest_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bockd.serving",
        description="Serve exported student(s) with KServe (V1, V2 REST); several --model_dir: an ensemble.",
        parents=[kserve.model_server.parser],  # --http_port, --model_name, ... like every kserve server
    )
    parser.add_argument(
        "--model_dir",
        action="append",
        required=True,
        help="an exported student folder; repeat it to serve the average of several students' logits",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help="onnx (model.onnx on ONNX Runtime, no PyTorch) or torch (model.safetensors, needs PyTorch)",
    )
    parser.add_argument("--host", default=LOCAL_HOST, help="REST bind address (0.0.0.0 inside a container)")
    parser.add_argument("--max_batch", type=int, default=256, help="most images in one request")
    parser.add_argument("--top_k", type=int, default=5, help="how many top classes each prediction lists")
    parser.set_defaults(enable_grpc=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = build_model(args.model_name, args.model_dir, args.backend, args.max_batch, args.top_k)
        model.load()
        server = HostModelServer(
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            workers=args.workers,
            max_threads=args.max_threads,
            max_asyncio_workers=args.max_asyncio_workers,
            enable_grpc=args.enable_grpc,
            enable_docs_url=args.enable_docs_url,
            enable_latency_logging=args.enable_latency_logging,
            access_log_format=args.access_log_format,
            event_loop=args.event_loop,
            timeout_keep_alive=args.timeout_keep_alive,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
        )
    except (BockdError, ValueError) as err:
        print(f"bockd.serving: error: {err}", file=sys.stderr)
        sys.exit(2)
    # What is loaded by now (kserve, the runtime, the model: ~466,000 objects with torch) lives as long as
    # the process.
    # Freezing it keeps the collector's full passes from rescanning it: a batch of 32 images as JSON lists
    # allocates ~33,000 lists, the full passes that set off took ~240 ms each, and they made the batch-32
    # p99 9x the p50 (docs/benchmarks.md, "Serving").
    gc.collect()
    gc.freeze()
    server.start([model])
