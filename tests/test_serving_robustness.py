"""The model server against real clients and hostile requests (issue 12, "Model server" items 1-6).

What a client sees goes through ``python -m bockd.serving`` subprocesses (the container's entrypoint, its
arguments and environment): a real Open Inference Protocol client (``tritonclient.http``), raw
``http.client`` requests whose headers are exactly what the test says, and the server's log file. Where a
test must hold a request inside the model or change the model's state, the same server runs in process on
a thread (``bockd.serving.server.build_rest_server``) around a model the test controls; whether a health
check answers while a request is held is decided by events, never by timing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import http.client
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from numerics import probability_tolerance, reduction_length
from PIL import Image
from serving_requests import in_process

from bockd.data import ImageDataset
from bockd.export import export_student, load_student, read_student_config
from bockd.platform.services.processes import free_ports
from bockd.serving import StudentModel
from bockd.serving.preprocess import RequestLimits
from bockd.serving.rest import build_rest_server

NAME = "s3"
SHARED_CASE = Path(__file__).resolve().parents[2] / "shared" / "cases" / "serving-16bit-png"
# The budgets of the `tight` server: small enough that a few digits exceed each one.
TIGHT = {
    "max_request_bytes": 200_000,
    "max_json_bytes": 100_000,
    "max_batch": 8,
    "max_image_pixels": 1024,
    "max_image_bytes": 20_000,
    "max_body_seconds": 2,
}
TIGHT_REQUEST_PIXELS = 2048  # set through the environment, as a ServingRuntime's `env:` would


# -- fixtures and helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def exported(single_thread, ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_student(ensemble_run, tmp_path_factory.mktemp("robust") / NAME, index=2)


@pytest.fixture(scope="module")
def images(digits: ImageDataset) -> np.ndarray:
    """32 test digits, uint8 [32, 8, 8, 1] (N, H, W, C)."""
    return np.ascontiguousarray(digits.test.x[:32])


@pytest.fixture(scope="module")
def reference(exported: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    """(probabilities of the 32 digits from the PyTorch student, tolerance for another process's ONNX)."""
    config = read_student_config(exported)
    mean = np.asarray(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    x = (images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std
    student = load_student(exported)
    with torch.no_grad():
        logits = student(torch.from_numpy(np.ascontiguousarray(x)))
    return torch.softmax(logits, 1).numpy(), probability_tolerance(logits, reduction_length(student))


def _spawn(folder: Path, log: Path, args: list[str], env: dict[str, str] | None = None) -> Iterator[Served]:
    port = free_ports(1)[0]
    argv = [sys.executable, "-m", "bockd.serving", "--model_dir", str(folder), "--model_name", NAME]
    argv += ["--http_port", str(port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(port, log)
    try:
        for _ in range(1200):
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError):
                if request(served, "GET", f"/v2/models/{NAME}/ready")[0] == 200:
                    break
            time.sleep(0.1)
        yield served
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(scope="module")
def server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """S3 on ONNX Runtime with the default budgets."""
    yield from _spawn(exported, tmp_path_factory.mktemp("served") / "server.log", [])


@pytest.fixture(scope="module")
def tight(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """S3 with small budgets: from arguments, and one from the environment."""
    args = [f"--{key}={value}" for key, value in TIGHT.items()]
    env = dict(os.environ, BOCKD_SERVING_MAX_REQUEST_PIXELS=str(TIGHT_REQUEST_PIXELS))
    yield from _spawn(exported, tmp_path_factory.mktemp("tight") / "server.log", args, env)


def request(
    served: Served, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (http.client adds Content-Length, nothing else)."""
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=120)
    try:
        chunked = body is not None and not isinstance(body, (bytes, bytearray))
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def v1(instances: list[Any]) -> bytes:
    return json.dumps({"instances": instances}).encode()


def v2_json(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def v2_binary(header: dict[str, Any], payload: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor-extension body: the JSON header, then the tensors' bytes."""
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head))}


def uint8_input(images: np.ndarray) -> dict[str, Any]:
    return {"name": "x", "shape": list(images.shape), "datatype": "UINT8", "data": images.ravel().tolist()}


def probabilities_v1(body: bytes) -> np.ndarray:
    return np.asarray([p["probabilities"] for p in json.loads(body)["predictions"]])


# -- in-process servers -------------------------------------------------------------------------------------


class HeldModel(StudentModel):
    """S3 whose predict() waits for ``release``: a request that stays in flight until the test says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
        with self._lock:
            self.calls += 1
        self.entered.set()
        assert self.release.wait(120), "the test never released the request"
        return super().predict(payload, headers, response_headers)


@contextlib.contextmanager
def serving(model: Any) -> Iterator[tuple[Served, Any]]:
    """``model`` (loaded) behind the real REST server on 127.0.0.1, on a thread of this process."""
    port = free_ports(1)[0]
    rest = build_rest_server([model], host="127.0.0.1", port=port)
    thread = threading.Thread(target=asyncio.run, args=(rest.start(),), daemon=True)
    thread.start()
    served = Served(port, Path("/dev/null"))
    try:
        for _ in range(600):
            if rest.started:
                break
            assert thread.is_alive(), "the in-process server stopped"
            time.sleep(0.05)
        yield served, rest
    finally:
        rest.should_exit = True
        thread.join(30)


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


def wait_for(condition: Any, what: str) -> None:
    for _ in range(1200):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- 1. no model repository endpoints; readiness follows the models ------------------------------------------


def test_repository_endpoints_are_not_served_and_the_model_keeps_serving(server: Served, images) -> None:
    for action in ("unload", "load"):
        status, _, body = request(server, "POST", f"/v2/repository/models/{NAME}/{action}")
        assert status == 404, (action, status, body)
        assert "model repository extension is not served" in error_of(body)
    assert request(server, "GET", "/v2/health/ready")[0] == 200
    status, _, body = request(server, "POST", f"/v1/models/{NAME}:predict", v1(images[:2].tolist()))
    assert status == 200, body
    meta = json.loads(request(server, "GET", "/v2")[2])
    assert "model_repository_extension" not in meta["extensions"]
    assert "binary_tensor_data" in meta["extensions"]


def test_readiness_follows_the_models(exported: Path, images) -> None:
    model = StudentModel(NAME, exported)
    model.load()
    with serving(model) as (served, _):
        assert request(served, "GET", "/v2/health/ready")[0] == 200
        model.ready = False  # what a model that failed (or is being stopped) reports
        assert request(served, "GET", "/v2/health/ready")[0] == 503
        assert request(served, "GET", f"/v2/models/{NAME}/ready")[0] == 503
        assert request(served, "POST", f"/v1/models/{NAME}:predict", v1(images[:1].tolist()))[0] == 503
        assert request(served, "GET", "/v2/health/live")[0] == 200  # the process itself is fine
        model.ready = True
        assert request(served, "GET", "/v2/health/ready")[0] == 200


# -- 2. budgets, work off the event loop, health under load -------------------------------------------------


def test_health_answers_while_a_request_is_in_flight(exported: Path, images) -> None:
    model = HeldModel(NAME, exported)
    model.load()
    with serving(model) as (served, _):
        try:
            thread, out = in_thread(
                request, served, "POST", f"/v1/models/{NAME}:predict", v1(images.tolist())
            )
            assert model.entered.wait(60), "the request never reached the model"
            for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{NAME}", "/v1/models"):
                assert request(served, "GET", path)[0] == 200, path
            assert thread.is_alive() and not out  # the held request is still in flight
        finally:
            model.release.set()
        thread.join(60)
        assert out[0][0] == 200


def test_requests_beyond_the_concurrency_limit_wait_for_a_slot(exported: Path, images) -> None:
    model = HeldModel(NAME, exported, limits=RequestLimits(max_concurrent_requests=1))
    model.load()
    body = v1(images[:2].tolist())
    with serving(model) as (served, rest):
        try:
            first, out1 = in_thread(request, served, "POST", f"/v1/models/{NAME}:predict", body)
            assert model.entered.wait(60)
            second, out2 = in_thread(request, served, "POST", f"/v1/models/{NAME}:predict", body)
            wait_for(lambda: rest.admissions[NAME].waiting == 1, "the second request to queue")
            assert model.calls == 1  # it waits for a slot: its body is not read, nothing is decoded
            assert request(served, "GET", "/v2/health/ready")[0] == 200
        finally:
            model.release.set()
        first.join(60)
        second.join(60)
    assert out1[0][0] == out2[0][0] == 200 and model.calls == 2


def test_budgets_refuse_with_413_before_decoding(tight: Served, images) -> None:
    path = f"/v2/models/{NAME}/infer"
    noise = png(np.random.default_rng(0).integers(0, 256, size=(30, 30), dtype=np.uint8))  # 900 pixels
    big = png(np.zeros((40, 40), np.uint8))  # 1600 pixels

    def cut(file: bytes) -> bytes:  # the header says the size; the pixels are truncated and cannot decode
        return file[: len(file) - 20]

    not_a_png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    cases = {
        # the body, declared by Content-Length or only counted while it streams
        "body": request(tight, "POST", path, b"x" * 300_000, {"Inference-Header-Content-Length": "10"}),
        "chunked body": request(
            tight, "POST", path, iter([b"x" * 60_000] * 5), {"Inference-Header-Content-Length": "10"}
        ),
        "json body": request(tight, "POST", path, b" " * 150_000),
        "v1 json body": request(tight, "POST", f"/v1/models/{NAME}:predict", b" " * 150_000),
        "batch": request(tight, "POST", path, v2_json([uint8_input(images[:9])])),
        # declared sizes over the budget, with data that would not even decode: refused first
        "request pixels": request(
            tight,
            "POST",
            path,
            *v2_binary(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [3, 30, 30, 1],
                            "datatype": "UINT8",
                            "parameters": {"binary_data_size": 2700},
                        }
                    ]
                },
                b"\0" * 2700,
            ),
        ),
        "image pixels": request(
            tight,
            "POST",
            path,
            v2_json([{"name": "x", "shape": [1, 40, 40, 1], "datatype": "UINT8", "data": [0]}]),
        ),
        "png pixels": request(tight, "POST", f"/v1/models/{NAME}:predict", v1([{"b64": b64(cut(big))}])),
        "png request pixels": request(
            tight, "POST", f"/v1/models/{NAME}:predict", v1([{"b64": b64(cut(noise))}] * 3)
        ),
        "encoded bytes": request(
            tight, "POST", f"/v1/models/{NAME}:predict", v1([{"b64": b64(not_a_png + b"\0" * 20_000)}])
        ),
    }
    for what, (status, _, body) in cases.items():
        assert status == 413, (what, status, body[:300])
        assert "limit" in error_of(body), (what, body)
        assert len(body) < 1000
    # The same server answers what fits.
    status, _, body = request(tight, "POST", path, v2_json([uint8_input(images[:8])]))
    assert status == 200, body


def test_a_stalled_or_compressed_body_is_refused(tight: Served, images) -> None:
    """A client that sends part of its body and stops gives its slot back (408); gzip bodies: 415."""
    conn = http.client.HTTPConnection("127.0.0.1", tight.port, timeout=120)
    try:
        conn.putrequest("POST", f"/v1/models/{NAME}:predict")
        conn.putheader("Content-Length", "1000")
        conn.endheaders(b"{")  # and nothing more
        resp = conn.getresponse()
        assert resp.status == 408 and "max_body_seconds" in error_of(resp.read())
    finally:
        conn.close()
    body = gzip.compress(v1(images[:1].tolist()))
    status, _, answer = request(
        tight, "POST", f"/v1/models/{NAME}:predict", body, {"Content-Encoding": "gzip"}
    )
    assert status == 415 and "uncompressed" in error_of(answer)
    assert request(tight, "POST", f"/v1/models/{NAME}:predict", v1(images[:1].tolist()))[0] == 200


def test_default_budget_refuses_what_froze_the_server(server: Served, images) -> None:
    """Two 4096x4096 PNGs (each allowed alone) in one request; a body over 32 MiB: 413, nothing decoded."""
    big = b64(png(np.zeros((4096, 4096), np.uint8)))
    status, _, body = request(server, "POST", f"/v1/models/{NAME}:predict", v1([{"b64": big}] * 2))
    assert status == 413 and "pixels" in error_of(body), body
    payload, headers = v2_binary({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]}, b"")
    status, _, body = request(
        server, "POST", f"/v2/models/{NAME}/infer", payload + b"\0" * (33 << 20), headers
    )
    assert status == 413 and "bytes" in error_of(body), body
    status, _, body = request(server, "POST", f"/v1/models/{NAME}:predict", v1(images[:4].tolist()))
    assert status == 200, body


def test_budgets_come_from_arguments_then_the_environment() -> None:
    from bockd.serving.server import build_parser, limits_from, size

    assert size("32Mi") == 32 << 20 and size("4096") == 4096 and size("2ki") == 2048
    with pytest.raises(argparse.ArgumentTypeError):
        size("0")
    env = {"BOCKD_SERVING_MAX_JSON_BYTES": "1Mi", "BOCKD_SERVING_MAX_BATCH": "16"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        parsed = build_parser().parse_args(["--model_dir", "m", "--max_batch", "8"])
        mp.setenv("BOCKD_SERVING_MAX_IMAGE_BYTES", "lots")
        with pytest.raises(SystemExit):
            build_parser()
    limits = limits_from(parsed)
    assert (limits.max_batch, limits.max_json_bytes) == (8, 1 << 20)  # the argument wins over the variable
    assert limits.max_request_bytes == RequestLimits().max_request_bytes


# -- 3. a real Open Inference Protocol client; the content types clients send --------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("batch", [1, 32])
def test_tritonclient_infers_json_and_binary(
    server: Served, images, reference, binary: bool, batch: int
) -> None:
    want, atol = reference
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    x = images[:batch]
    tensors = {
        "UINT8": x,
        "FP32": np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0),
        "BYTES": np.asarray([png(img) if binary else b64(png(img)).encode() for img in x], dtype=np.object_),
    }
    for datatype, tensor in tensors.items():
        inp = triton.InferInput("input", list(tensor.shape), datatype)
        inp.set_data_from_numpy(tensor, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "top_k_classes")
        ]
        result = client.infer(NAME, [inp], outputs=outputs)
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), want[:batch], atol=atol, err_msg=datatype
        )
        classes = result.as_numpy("top_k_classes")  # bytes from binary outputs, str from JSON ones
        top = classes[0, 0].decode() if isinstance(classes[0, 0], bytes) else classes[0, 0]
        assert classes.shape == (batch, 5) and top == str(int(want[0].argmax()))


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "text/plain",
    ],
)
def test_json_bodies_are_json_whatever_the_content_type_says(
    server: Served, images, reference, content_type: str | None
) -> None:
    want, atol = reference
    headers = {"Content-Type": content_type} if content_type else {}
    status, _, body = request(server, "POST", f"/v1/models/{NAME}:predict", v1(images[:2].tolist()), headers)
    assert status == 200, body
    np.testing.assert_allclose(probabilities_v1(body), want[:2], atol=atol)
    status, _, body = request(
        server, "POST", f"/v2/models/{NAME}/infer", v2_json([uint8_input(images[:2])]), headers
    )
    assert status == 200, body
    probs = next(o for o in json.loads(body)["outputs"] if o["name"] == "probabilities")
    np.testing.assert_allclose(np.reshape(probs["data"], (2, 10)), want[:2], atol=atol)


# -- 4. malformed binary-extension requests: short 4xx, one log line, no payload -----------------------------


def malformed_binary_requests() -> dict[str, tuple[bytes, dict[str, str]]]:
    x = {"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
    ok, hdr = v2_binary({"inputs": [x]}, b"\0" * 256)
    hlen = int(hdr["Inference-Header-Content-Length"])
    marker = b"PAYLOAD-MARKER-" * 1000

    def header(h: dict[str, Any], payload: bytes) -> tuple[bytes, dict[str, str]]:
        return v2_binary(h, payload)

    def inp(**fields: Any) -> dict[str, Any]:
        return {"inputs": [{**x, **fields}]}

    return {
        "header length past the body": (ok, {"Inference-Header-Content-Length": str(hlen + 10**6)}),
        "header length not a number": (ok, {"Inference-Header-Content-Length": "abc"}),
        "header length negative": (ok, {"Inference-Header-Content-Length": "-5"}),
        "header length zero": (ok, {"Inference-Header-Content-Length": "0"}),
        "header length of 5000 digits": (ok, {"Inference-Header-Content-Length": "9" * 5000}),
        "header not UTF-8": (b"\xff" * 40 + marker, {"Inference-Header-Content-Length": "40"}),
        "header not an object": (b"[1,2,3]" + marker, {"Inference-Header-Content-Length": "7"}),
        "tensor bytes missing": (ok[:-100], hdr),
        "tensor bytes left over": (ok + marker, hdr),
        "4 MB of garbage": (marker * 270, {"Inference-Header-Content-Length": "100"}),
        "binary_data_size negative": header(inp(parameters={"binary_data_size": -1}), b"\0" * 256),
        "binary_data_size a string": header(inp(parameters={"binary_data_size": "a"}), b"\0" * 256),
        "size not shape x 4 bytes": header(inp(parameters={"binary_data_size": 255}), b"\0" * 255),
        "shape not ints": header(inp(shape=["a", 1, 8, 8]), b"\0" * 256),
        "huge shape": header(inp(shape=[1] * 100_000), b"\0" * 256),
        "huge name, wrong datatype": header(inp(name="n" * 100_000, datatype="INT32"), b"\0" * 256),
        "datatype not a string": header(inp(datatype=5), b"\0" * 256),
        "BYTES element length past the end": header(
            {
                "inputs": [
                    {"name": "b", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 10}}
                ]
            },
            b"\xff\xff\x00\x00abcdef",
        ),
        "BYTES elements fewer than the shape": header(
            {
                "inputs": [
                    {"name": "b", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 10}}
                ]
            },
            b"\x06\x00\x00\x00abcdef",
        ),
        "BYTES raw bytes that are no image": header(
            {
                "inputs": [
                    {
                        "name": "b",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 4 + len(marker)},
                    }
                ]
            },
            len(marker).to_bytes(4, "little") + b"\x89PNG\r\n\x1a\n" + marker[8:],
        ),
        "BYTES not UTF-8, not an image": header(
            {
                "inputs": [
                    {
                        "name": "b",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 4 + 3000},
                    }
                ]
            },
            (3000).to_bytes(4, "little") + b"\xfe" * 3000,
        ),
        "output binary_data not a bool": header(
            {**inp(), "outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]},
            b"\0" * 256,
        ),
        "outputs not a list": header({**inp(), "outputs": "probabilities"}, b"\0" * 256),
        "id not a string": header({**inp(), "id": {"a": 1}}, b"\0" * 256),
    }


def test_malformed_binary_requests_get_a_short_4xx_and_one_log_line(server: Served) -> None:
    start = server.log.stat().st_size
    cases = malformed_binary_requests()
    for what, (body, headers) in cases.items():
        status, _, answer = request(server, "POST", f"/v2/models/{NAME}/infer", body, headers)
        assert status == 400, (what, status, answer[:300])
        assert len(answer) < 1000 and b"PAYLOAD-MARKER" not in answer and b"n" * 100 not in answer, what
        assert error_of(answer), what

    def refused() -> list[str]:  # the server's one-line records of them, once its output reached the file
        return [ln for ln in server.log.read_bytes()[start:].decode().splitlines() if "-> 400" in ln]

    wait_for(lambda: len(refused()) >= len(cases), "a log line per refused request")
    log = server.log.read_bytes()[start:]
    assert b"Traceback" not in log and b"PAYLOAD-MARKER" not in log and b"n" * 100 not in log
    assert len(log) < 1500 * len(cases), len(log)  # a few short lines per request, never the payload
    assert len(refused()) == len(cases), refused()


class BrokenModel(StudentModel):
    """S3 whose predict() fails the way a bug would, with an exception that quotes the whole batch."""

    def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
        raise RuntimeError("PAYLOAD-MARKER " * 100_000)


def test_an_unexpected_error_is_a_short_500_logged_once(exported: Path, images) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("kserve.bockd")
    logger.addHandler(handler)
    model = BrokenModel(NAME, exported)
    model.load()
    try:
        with serving(model) as (served, _):
            status, _, body = request(served, "POST", f"/v1/models/{NAME}:predict", v1(images[:1].tolist()))
            assert request(served, "GET", "/v2/health/ready")[0] == 200
    finally:
        logger.removeHandler(handler)
    assert status == 500 and len(body) < 1000 and "RuntimeError" in error_of(body)
    (record,) = [r for r in records if "-> 500" in r.getMessage()]
    text = record.getMessage()
    assert "in predict" in text  # the traceback's frames, to find the bug
    assert len(text) < 20_000 and text.count("PAYLOAD-MARKER") < 20  # not the exception's whole text


def test_raw_image_bytes_in_a_bytes_input(server: Served, images, reference) -> None:
    """Binary extension: raw PNG bytes (what a BYTES element holds natively) or base64 text; JSON: base64."""
    want, atol = reference
    files = [png(img) for img in images[:3]]
    for elements in (files, [b64(f).encode() for f in files]):
        payload = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
        header = {
            "inputs": [
                {
                    "name": "b",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
        status, _, body = request(server, "POST", f"/v2/models/{NAME}/infer", *v2_binary(header, payload))
        assert status == 200, body
        probs = next(o for o in json.loads(body)["outputs"] if o["name"] == "probabilities")
        np.testing.assert_allclose(np.reshape(probs["data"], (3, 10)), want[:3], atol=atol)
    raw = files[0].decode("latin-1")  # what a client that put the file itself in a JSON string sends
    status, _, body = request(
        server,
        "POST",
        f"/v2/models/{NAME}/infer",
        v2_json([{"name": "b", "shape": [1], "datatype": "BYTES", "data": [raw]}]),
    )
    assert status == 400 and "base64" in error_of(body), body


# -- 5. metadata says what is accepted -----------------------------------------------------------------------

ACCEPTED_INPUTS = [
    {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
    {"name": "input_uint8", "datatype": "UINT8", "shape": [-1, 8, 8, 1]},
    {"name": "input_bytes", "datatype": "BYTES", "shape": [-1]},
]


def test_metadata_lists_every_accepted_input(server: Served) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    meta = client.get_model_metadata(NAME)
    assert meta["inputs"] == ACCEPTED_INPUTS
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "top_k_indices", "top_k_classes"]


# -- 6. 16-bit PNGs answer like their 8-bit twins ------------------------------------------------------------


def test_a_16_bit_png_answers_like_its_8_bit_twin(exported: Path, images) -> None:
    model = StudentModel(NAME, exported)
    model.load()
    grey8 = images[:4, ..., 0]
    pngs8 = [png(img) for img in grey8]
    pngs16 = [png(img.astype(np.uint16) * 257) for img in grey8]  # the same pictures at 16 bits
    assert Image.open(io.BytesIO(pngs16[0])).mode == "I;16"
    answers = {}
    for bits, files in ((8, pngs8), (16, pngs16)):
        out = in_process(model, {"instances": [{"b64": b64(f)} for f in files]})
        answers[bits, "v1"] = probabilities_v1(json.dumps(out).encode())
        body = {"inputs": [{"name": "b", "shape": [4], "datatype": "BYTES", "data": [b64(f) for f in files]}]}
        outs = {o["name"]: o for o in in_process(model, body, v2=True)["outputs"]}
        answers[bits, "v2"] = np.reshape(outs["probabilities"]["data"], (4, 10))
    for protocol in ("v1", "v2"):
        np.testing.assert_array_equal(answers[16, protocol], answers[8, protocol])


def test_the_shared_16_bit_case_answers_like_its_8_bit_twin(exported: Path) -> None:
    if not SHARED_CASE.is_dir():
        pytest.skip(f"{SHARED_CASE} is not here (it lives in the shared folder beside the repository)")
    model = StudentModel(NAME, exported)
    model.load()
    answers = [
        in_process(model, json.loads((SHARED_CASE / f"request_v1_d005_{bits}.json").read_text()))
        for bits in ("16bit", "8bit")
    ]
    assert answers[0] == answers[1]
