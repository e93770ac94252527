"""Latency through the real model server (`bockd.platform.serving_benchmark`) and the int8 faster rule.

The measurement runs a real ``python -m bockd.serving`` on a tiny exported student of the session's
ensemble run and its int8 version; what it asserts is the shape and bookkeeping of the numbers, never a
wall-clock limit. The faster rule is fed made-up latencies: its verdicts are deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bockd.data import ImageDataset
from bockd.errors import DataError
from bockd.export import export_student
from bockd.platform.services.model_servers import list_local_servers
from bockd.platform.serving_benchmark import (
    MIN_SAMPLES,
    ServedMeasurement,
    measurably_faster,
    measure_interleaved,
    measure_served,
    probabilities_from_answer,
    v2_binary_request,
)
from bockd.quantize import quantize_student

pytestmark = pytest.mark.usefixtures("single_thread")

REQUESTS = {1: 12, 4: 3}  # few, to keep the test short; the rule needs MIN_SAMPLES at batch 1


@pytest.fixture(scope="module")
def folders(ensemble_run: Path, digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """S3 exported with ONNX (fp32) and its int8 version (calibrated on 64 training digits)."""
    root = tmp_path_factory.mktemp("bench")
    fp32 = export_student(ensemble_run, root / "s3", 2)
    int8 = quantize_student(fp32, root / "s3-int8", digits.train.x, max_images=64)
    return {"fp32": fp32, "int8": int8}


@pytest.fixture(scope="module")
def measured(folders: dict, digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """fp32 and int8 measured together, their requests taking turns (what the measure step does)."""
    state = tmp_path_factory.mktemp("bench-state")
    fp32, int8 = measure_interleaved(
        [folders["fp32"], folders["int8"]],
        digits.test.x[:20],
        batch_sizes=(4, 1),
        requests=REQUESTS,
        warmup=1,
        state_dir=state,
    )
    return {"fp32": fp32, "int8": int8, "state": state}


def test_every_batch_size_is_timed_through_the_server(measured: dict, folders: dict) -> None:
    m: ServedMeasurement = measured["fp32"]
    assert [t.batch for t in m.timings] == [1, 4]  # sorted, whatever order they were asked in
    for t in m.timings:
        assert t.requests == REQUESTS[t.batch] == len(t.samples_ms)
        assert 0 < min(t.samples_ms) <= t.p50_ms <= t.p99_ms <= max(t.samples_ms)
        assert t.p50_ms == pytest.approx(float(np.median(t.samples_ms)))
        assert t.images_per_s > 0 and t.raw_forward_ms > 0
    assert m.at(4) is m.timings[1] and m.at(32) is None
    assert m.size_bytes == (folders["fp32"] / "model.onnx").stat().st_size
    assert (m.precision, m.student_name, m.threads) == ("fp32", "resnet20-s3", 1)


def test_the_int8_version_is_measured_as_int8_and_is_smaller(measured: dict) -> None:
    int8, fp32 = measured["int8"], measured["fp32"]
    assert (int8.precision, int8.student_name) == ("int8", "resnet20-s3-int8")
    assert int8.size_bytes < fp32.size_bytes  # int8 weights: about a quarter, plus scales and graph
    assert [t.batch for t in int8.timings] == [1, 4]
    assert [t.requests for t in int8.timings] == [t.requests for t in fp32.timings]
    assert int8.machine == fp32.machine  # one measurement, one machine reading


def test_one_student_alone(folders: dict, digits: ImageDataset, tmp_path: Path) -> None:
    m = measure_served(
        folders["fp32"], digits.test.x[:3], batch_sizes=(1,), requests=2, warmup=0, state_dir=tmp_path
    )
    assert [(t.batch, t.requests, len(t.samples_ms)) for t in m.timings] == [(1, 2, 2)]
    assert m.precision == "fp32" and list_local_servers(tmp_path) == []


def test_the_machine_is_recorded(measured: dict) -> None:
    machine = measured["fp32"].machine
    assert machine.cpu and machine.cores >= 1 and 1 <= machine.usable_cores <= machine.cores
    assert machine.onnxruntime[0].isdigit()
    # The record round-trips through JSON (what the measure step writes).
    again = ServedMeasurement.model_validate(json.loads(measured["fp32"].model_dump_json()))
    assert again == measured["fp32"]


def test_no_server_is_left_running(measured: dict) -> None:
    assert list_local_servers(measured["state"]) == []
    assert not list(Path(measured["state"]).glob("*.json"))


def test_wrong_images_fail_before_a_server_starts(folders: dict, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"takes \[N, 8, 8, 1\]"):
        measure_served(folders["fp32"], np.zeros((4, 32, 32, 3), np.uint8), state_dir=tmp_path)
    digits = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(DataError, match="batch_sizes"):
        measure_served(folders["fp32"], digits, batch_sizes=(0,), state_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_binary_request_carries_the_pixels_unchanged() -> None:
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    body, headers = v2_binary_request(images)
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:n])
    (inp,) = header["inputs"]
    assert (inp["datatype"], inp["shape"]) == ("UINT8", [2, 8, 8, 1])
    assert inp["parameters"]["binary_data_size"] == len(body) - n == images.nbytes
    assert body[n:] == images.tobytes()
    # An answer in the binary extension: JSON header, then float32 probabilities.
    probs = np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)
    head = json.dumps(
        {"outputs": [{"name": "probabilities", "shape": [2, 2], "parameters": {"binary_data_size": 16}}]}
    ).encode()
    got = probabilities_from_answer(head + probs.tobytes(), str(len(head)), 2)
    np.testing.assert_array_equal(got, probs)


# -- the faster rule, on made-up latencies ---------------------------------------------------------------


def latencies(median: float, n: int = 30, spread: float = 0.05, seed: int = 0) -> list[float]:
    """``n`` positive latencies (ms) around ``median``, +-``spread`` relative, seeded."""
    rng = np.random.default_rng(seed)
    return list(median * (1 + spread * rng.uniform(-1, 1, n)))


def test_a_clearly_faster_int8_is_faster() -> None:
    faster, reason = measurably_faster(latencies(1.0), latencies(2.0, seed=1))
    assert faster
    assert reason.startswith("faster: p50 ") and "2.0" in reason and "95% CI" in reason


@pytest.mark.parametrize(
    ("int8_ms", "fp32_ms"),
    [(2.0, 2.0), (2.1, 2.0), (3.0, 2.0)],  # the same, within noise, slower
)
def test_an_int8_that_is_not_faster_is_not(int8_ms: float, fp32_ms: float) -> None:
    faster, reason = measurably_faster(latencies(int8_ms), latencies(fp32_ms, seed=1))
    assert not faster
    assert reason.startswith("not measurably faster: ")


def test_a_speedup_smaller_than_the_noise_is_not_faster() -> None:
    """5 % faster in the medians, but requests spread +-40 %: the interval reaches below 1."""
    faster, reason = measurably_faster(latencies(1.9, spread=0.4), latencies(2.0, spread=0.4, seed=1))
    assert not faster and "CI 0." in reason


def test_the_verdict_is_deterministic_and_honours_min_speedup() -> None:
    a, b = latencies(1.0), latencies(2.0, seed=1)
    assert measurably_faster(a, b) == measurably_faster(a, b)
    faster, reason = measurably_faster(a, b, min_speedup=2.5)
    assert not faster and "above 2.50x" in reason


def test_too_few_requests_are_never_faster() -> None:
    faster, reason = measurably_faster(latencies(1.0, n=MIN_SAMPLES - 1), latencies(5.0))
    assert not faster and "too few timed requests" in reason
    with pytest.raises(ValueError, match="finite and positive"):
        measurably_faster([0.0] * 20, latencies(1.0))
