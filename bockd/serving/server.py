"""The model-server process: kserve's standard arguments plus ours, and a ModelServer that can bind 127.0.0.1.

kserve 0.21's REST server hardcodes ``host="0.0.0.0"`` in its uvicorn config and its gRPC server listens on
``[::]``; there is no option for either. ``HostModelServer`` runs ``bockd.serving.rest.BockdRESTServer``
(kserve's REST server with bounded inference routes, honest readiness and no model repository extension)
bound to ``--host``; gRPC is off by default here because it cannot be bound to one interface.

Request budgets (``RequestLimits``) are arguments (``--max_request_bytes`` ...) whose defaults come from
the environment (``BOCKD_SERVING_MAX_REQUEST_BYTES`` ...), then from ``RequestLimits``; sizes take a
``Ki``/``Mi``/``Gi`` suffix. docs/serving.md says what each bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import kserve
from kserve.model import BaseKServeModel
from kserve.protocol.grpc.server import GRPCServer

from bockd.errors import BockdError
from bockd.serving.model import BACKENDS, DEFAULT_BACKEND, build_model
from bockd.serving.preprocess import RequestLimits
from bockd.serving.rest import BockdRESTServer, FixedModelRepository, ServingDataPlane, new_app

LOCAL_HOST = "127.0.0.1"
_ALL_INTERFACES = ("0.0.0.0", "::", "")
ENV_PREFIX = "BOCKD_SERVING_"
_SUFFIXES = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}
LIMIT_HELP = {
    "max_batch": "most images in one request",
    "max_request_bytes": "most bytes in a request body of any kind (413 past it, before reading)",
    "max_json_bytes": "most bytes of JSON: a JSON body, or the header of a binary-extension body",
    "max_request_pixels": "most pixels (height x width, as sent) summed over one request's images",
    "max_image_pixels": "most pixels (height x width, as sent) in one image",
    "max_image_bytes": "most bytes in one encoded PNG/JPEG",
    "max_concurrent_requests": "requests read, decoded and run at once; later ones wait, their bodies unread",
    "max_body_seconds": "seconds to receive a request's body once it has a slot (408 past it)",
}


class HostModelServer(kserve.ModelServer):
    """kserve's ModelServer serving ``BockdRESTServer`` on ``host`` (one process: the budgets are per
    process, and the pod's memory limit is per pod)."""

    def __init__(self, host: str = LOCAL_HOST, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host
        if self.workers != 1:
            raise ValueError(
                f"--workers {self.workers}: this server runs one process (its request budgets are per "
                "process and the pod's memory limit is shared); scale with replicas instead"
            )
        if host not in _ALL_INTERFACES and self.enable_grpc:
            raise ValueError(
                f"--host {host}: kserve 0.21 binds gRPC on all interfaces; use --enable_grpc false, or "
                "--host 0.0.0.0"
            )
        self.dataplane = ServingDataPlane(self.registered_models)
        self.model_repository_extension = FixedModelRepository(self.registered_models, self.dataplane)

    def start(self, models: list[BaseKServeModel]) -> None:
        # kserve's ModelServer.start (model_server.py), single-process, with our REST server.
        self._register_and_check_atleast_one_model_is_ready(models)
        self.dataplane.expected = [m.name for m in models]
        self._rest_server = BockdRESTServer(
            new_app(self.enable_docs_url),
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            self.host,
            access_log_format=self.access_log_format,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = GRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs=vars(kserve.model_server.args),
                grace_period=self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def size(text: str) -> int:
    """A positive integer, optionally with a binary suffix: ``"32Mi"`` -> 33554432."""
    value = str(text).strip()
    scale = _SUFFIXES.get(value[-2:].lower(), 1)
    digits = value[:-2] if scale > 1 else value
    if not (digits.isascii() and digits.isdigit()) or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (optionally Ki, Mi or Gi)")
    return int(digits) * scale


def add_limit_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """``--<limit>`` for each RequestLimits field; default ``BOCKD_SERVING_<LIMIT>``, else the field's."""
    environ = os.environ if environ is None else environ
    for field in fields(RequestLimits):
        env = ENV_PREFIX + field.name.upper()
        default = field.default
        if env in environ:
            try:
                default = size(environ[env])
            except argparse.ArgumentTypeError as err:
                parser.error(f"environment variable {env}: {err}")
        parser.add_argument(
            f"--{field.name}",
            type=size,
            default=default,
            help=f"{LIMIT_HELP[field.name]} (env {env}; default {field.default})",
        )


def limits_from(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(**{field.name: getattr(args, field.name) for field in fields(RequestLimits)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bockd.serving",
        description="Serve exported student(s) with KServe (V1, V2 REST); several --model_dir: an ensemble; "
        "a cascade folder: a confidence cascade.",
        parents=[kserve.model_server.parser],  # --http_port, --model_name, ... like every kserve server
    )
    parser.add_argument(
        "--model_dir",
        action="append",
        required=True,
        help="an exported student folder (repeat it to serve the average of several students' logits), "
        "or one cascade folder (cascade.json: bockd.cascade)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help="onnx (model.onnx on ONNX Runtime, no PyTorch) or torch (model.safetensors, needs PyTorch)",
    )
    parser.add_argument("--host", default=LOCAL_HOST, help="REST bind address (0.0.0.0 inside a container)")
    parser.add_argument("--top_k", type=int, default=5, help="how many top classes each prediction lists")
    add_limit_arguments(parser)
    parser.set_defaults(enable_grpc=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = build_model(
            args.model_name, args.model_dir, args.backend, top_k=args.top_k, limits=limits_from(args)
        )
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
