"""Run one task of the compiled pipeline the way the KFP v2 backend runs it, inside the trainer image.

The container's command and args are taken verbatim from the compiled IR (``deploymentSpec.executors``);
``{{$}}`` becomes an ExecutorInput like the one the driver writes: the task's input parameters resolved
from the pipeline's defaults, each output artifact under an ``s3://`` pipeline root (the executor reads
and writes it at ``/s3/...``, where the launcher mounts a scratch volume; here a host folder), output
parameters and the executor's output file at the launcher's paths under /tmp. The task's env from the IR
is set too. Afterwards the outputs are checked and summarized as JSON.

Usage (images/build.sh): python3 kfp_component.py PIPELINE.yaml TASK SUMMARY.json
Needs only what the trainer image has (PyYAML comes with kfp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

PIPELINE_ROOT = "s3://bockd/v2/artifacts"
OUTPUT_METADATA = "/tmp/kfp_outputs/output_metadata.json"  # the launcher's OutputMetadataFilepath


def load_ir(path: Path) -> dict[str, Any]:
    # The compiled file holds the pipeline spec, then the platform spec (kfp-kubernetes) as a 2nd document.
    return next(iter(yaml.safe_load_all(path.read_text())))


def task_inputs(ir: dict[str, Any], task: str) -> dict[str, Any]:
    """The task's input parameters as the driver resolves them when the run uses the pipeline's defaults."""
    defaults = ir["root"]["inputDefinitions"]["parameters"]
    values = {}
    for name, spec in ir["root"]["dag"]["tasks"][task]["inputs"].get("parameters", {}).items():
        if "componentInputParameter" not in spec:
            raise SystemExit(f"{task}.{name}: only inputs taken from pipeline parameters are supported here")
        values[name] = defaults[spec["componentInputParameter"]]["defaultValue"]
    return values


def executor_input(ir: dict[str, Any], task: str, run_id: str) -> dict[str, Any]:
    component = ir["components"][ir["root"]["dag"]["tasks"][task]["componentRef"]["name"]]
    outputs = component.get("outputDefinitions", {})
    artifacts = {
        name: {
            "artifacts": [
                {
                    "name": name,
                    "type": spec["artifactType"],
                    "uri": f"{PIPELINE_ROOT}/bockd/{run_id}/{task}/{uuid.uuid4()}/{name}",
                    "metadata": {},
                }
            ]
        }
        for name, spec in outputs.get("artifacts", {}).items()
    }
    parameters = {name: {"outputFile": f"/tmp/kfp/outputs/{name}"} for name in outputs.get("parameters", {})}
    return {
        "inputs": {"parameterValues": task_inputs(ir, task)},
        "outputs": {"artifacts": artifacts, "parameters": parameters, "outputFile": OUTPUT_METADATA},
    }


def container_of(ir: dict[str, Any], task: str) -> dict[str, Any]:
    component = ir["components"][ir["root"]["dag"]["tasks"][task]["componentRef"]["name"]]
    return ir["deploymentSpec"]["executors"][component["executorLabel"]]["container"]


def local_path(uri: str) -> Path:
    return Path("/s3") / uri.removeprefix("s3://")  # kfp.dsl.types.artifact_types: s3:// -> /s3/


def run_task(ir: dict[str, Any], task: str) -> tuple[dict[str, Any], list[str]]:
    container = container_of(ir, task)
    exec_input = executor_input(ir, task, run_id=str(uuid.uuid4()))
    placeholder = json.dumps(exec_input)
    argv = container["command"] + [arg.replace("{{$}}", placeholder) for arg in container.get("args", [])]
    env = dict(os.environ, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    print(f"image in the IR: {container['image']}", flush=True)
    shown = [a if len(a) < 60 else f"<{len(a)} chars>" for a in argv]
    print(f"running the IR's command line: {shown}", flush=True)
    subprocess.run(argv, env=env, check=True)
    return exec_input, argv


def summarize(exec_input: dict[str, Any]) -> dict[str, Any]:
    """What the task produced, checked: each output artifact written, named by the executor output."""
    executor_output = json.loads(Path(OUTPUT_METADATA).read_text())
    summary: dict[str, Any] = {"executor_output": executor_output, "artifacts": {}}
    for name, spec in exec_input["outputs"]["artifacts"].items():
        uri = spec["artifacts"][0]["uri"]
        path = local_path(uri)
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        if not files:
            raise SystemExit(f"output artifact {name}: nothing written at {path}")
        (reported,) = executor_output["artifacts"][name]["artifacts"]
        if reported["uri"] != uri:
            raise SystemExit(f"output artifact {name}: executor output names {reported['uri']}, not {uri}")
        if "meta.json" in files:  # a bockd Dataset: its content hash is also the task's metadata
            digest = json.loads((path / "meta.json").read_text()).get("sha256")
            if digest != reported["metadata"].get("sha256", digest):
                raise SystemExit(f"output artifact {name}: meta.json sha256 {digest} is not the reported one")
        summary["artifacts"][name] = {"uri": uri, "path": str(path), "files": files}
    missing = set(exec_input["outputs"]["parameters"]) - set(executor_output.get("parameterValues", {}))
    if missing:
        raise SystemExit(f"output parameters missing from the executor output: {sorted(missing)}")
    return summary


def main(argv: list[str]) -> int:
    pipeline, task, out = Path(argv[0]), argv[1], Path(argv[2])
    ir = load_ir(pipeline)
    exec_input, command_line = run_task(ir, task)
    summary = summarize(exec_input)
    summary |= {"executor_input": exec_input, "command_line": command_line}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for name, artifact in summary["artifacts"].items():
        print(f"{task}: output {name} = {artifact['uri']}: {artifact['files']}")
    print(f"{task}: executor output {json.dumps(summary['executor_output'])[:600]}")
    print(f"{task}: ok, summary in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
