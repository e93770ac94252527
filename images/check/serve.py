"""Start the serving image's entrypoint as the bockd-predictor ClusterServingRuntime does, ask it once on
V1 and once on V2, and report how long it took to become ready.

The command line is the image's ENTRYPOINT followed by the runtime's container args from
manifests/base/serving-runtime.yaml, ``{{.Name}}`` replaced by the model name: what KServe runs in the
predictor pod. The requests go to 127.0.0.1 (images/build.sh runs this in a network namespace of its own,
where the server's 0.0.0.0 is only loopback).

Usage: python serve.py IMAGE_JSON RUNTIME_YAML NAME PREPARE_DATA_JSON REFERENCE_JSON SUMMARY_JSON
(IMAGE_JSON: `buildah inspect --type image` of the serving image, for its ENTRYPOINT; PREPARE_DATA_JSON: what
kfp_component.py wrote for prepare-data, whose Dataset's first test images are sent; REFERENCE_JSON: the
student's probabilities for them from PyTorch in the trainer image (reference.py), which both answers
must match.)
Needs only what the serving image has (PyYAML and numpy come with kserve).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
READY_TIMEOUT_S = 120
STARTS = 3  # the start time varies with the page cache and the machine's load: the first start and two more
NUM_IMAGES = 8  # the first test images, as in reference.py
ATOL = 1e-4  # ONNX Runtime against PyTorch, float32 (tests/test_serving.py uses the same)


def server_argv(entrypoint: list[str], runtime_yaml: Path, name: str) -> list[str]:
    runtime = yaml.safe_load(runtime_yaml.read_text())
    (container,) = runtime["spec"]["containers"]
    return entrypoint + [arg.replace("{{.Name}}", name) for arg in container["args"]]


def port_of(argv: list[str]) -> int:
    ports = [a.split("=", 1)[1] for a in argv if a.startswith("--http_port=")]
    return int(ports[-1]) if ports else 8080  # the last one wins, as in argparse


def request(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def wait_ready(proc: subprocess.Popen, url: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise SystemExit(f"the model server exited with {proc.returncode} before it was ready")
        try:
            if request(url)[0] == 200:
                return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"the model server was not ready after {READY_TIMEOUT_S} s")


def ask(base: str, name: str, images: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """One V1 and one V2 request with the same uint8 images; both must give the reference probabilities."""
    status, v1 = request(f"{base}/v1/models/{name}:predict", {"instances": images.tolist()})
    if status != 200:
        raise SystemExit(f"V1: HTTP {status}: {v1}")
    tensor = {"name": "input", "datatype": "UINT8", "shape": list(images.shape)}
    tensor["data"] = images.ravel().tolist()
    status, v2 = request(f"{base}/v2/models/{name}/infer", {"inputs": [tensor]})
    if status != 200:
        raise SystemExit(f"V2: HTTP {status}: {v2}")
    p1 = np.asarray([row["probabilities"] for row in v1["predictions"]], dtype=np.float32)
    out = {o["name"]: o for o in v2["outputs"]}
    p2 = np.asarray(out["probabilities"]["data"], dtype=np.float32).reshape(out["probabilities"]["shape"])
    for protocol, probs in (("V1", p1), ("V2", p2)):
        if probs.shape != reference.shape or not np.allclose(probs, reference, atol=ATOL):
            error = np.abs(probs - reference).max() if probs.shape == reference.shape else probs.shape
            raise SystemExit(f"{protocol}: not the student's answer (PyTorch in the trainer image): {error}")
    return {
        "max_abs_diff_to_torch": float(max(np.abs(p1 - reference).max(), np.abs(p2 - reference).max())),
        "v1_top1": [row["top_k"][0]["class"] for row in v1["predictions"]],
        "v2_top_k_classes": out["top_k_classes"]["data"][:: out["top_k_classes"]["shape"][1]],
        "v2_model_name": v2["model_name"],
    }


def main(argv: list[str]) -> int:
    image = json.loads(Path(argv[0]).read_text())
    entrypoint, runtime_yaml, name = image["OCIv1"]["config"]["Entrypoint"], Path(argv[1]), argv[2]
    prepared, out = json.loads(Path(argv[3]).read_text()), Path(argv[5])
    reference = np.asarray(json.loads(Path(argv[4]).read_text())["probabilities"], dtype=np.float32)
    dataset = Path(prepared["artifacts"]["dataset"]["path"])
    with np.load(dataset / "test.npz") as test:
        images, labels = test["x"][:NUM_IMAGES], test["y"][:NUM_IMAGES]
    classes = json.loads((dataset / "meta.json").read_text())["classes"]
    torch = importlib.util.find_spec("torch")
    print(f"user {os.getuid()}:{os.getgid()}, torch {'installed' if torch else 'not installed'}", flush=True)
    cmd = server_argv(entrypoint, runtime_yaml, name)
    base = f"http://127.0.0.1:{port_of(cmd)}"
    print(f"starting: {' '.join(cmd)}", flush=True)
    ready_s, answers = [], {}
    for start in range(STARTS):
        proc = subprocess.Popen(cmd)
        try:
            ready_s.append(round(wait_ready(proc, f"{base}/v2/models/{name}/ready"), 2))
            print(f"start {start + 1}: ready after {ready_s[-1]:.2f} s", flush=True)
            answers = answers or ask(base, name, images, reference)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    truth = [str(classes[int(y)]) for y in labels]
    correct = sum(p == t for p, t in zip(answers["v1_top1"], truth, strict=True))
    summary = {"command": cmd, "ready_s": ready_s, "torch": torch is not None, "labels": truth}
    summary |= answers
    summary["correct"] = f"{correct}/{len(labels)}"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    keys = ("ready_s", "torch", "v1_top1", "labels", "correct", "max_abs_diff_to_torch")
    print(json.dumps({k: summary[k] for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
