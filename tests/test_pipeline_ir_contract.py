"""Contract: every task input of the compiled pipeline passes the KFP v2 driver's parameter type check.

kfp.local passes Python values from task to task, so a type the real backend refuses never shows in a
local run; these tests apply the backend's rule to the IR the compiler writes, for every compile variant.

The rule (kubeflow/pipelines ``backend/src/v2/driver/resolve.go``, tag 2.17.0, commit 4a3592c):
``handleParamTypeValidationAndConversion`` (lines 169-256) runs after every input is resolved and checks
it against the *consumer's* declared ``parameterType``. A STRING input turns any other value into its JSON
text (lines 203-217); any other type refuses a value of another kind, a string included (lines 218-252).
A ParallelFor iteration receives ``items[i]`` of its list (line 298) and the same check runs against the
loop component's declared item input, which the compiler types from the list's annotation: a bare
``list`` compiles to a STRING item, so the number 3 becomes the text "3" and an ``int`` input refuses it.
Here a producer's type must *equal* its consumer's, so no value changes kind on its way.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from bockd.cli import main
from bockd.components import make_components
from bockd.pipeline.pipeline import build_pipeline

VARIANTS = {
    "default": [],
    "gpus-2": ["--gpus", "2"],  # training through a TrainJob launcher
    "num-nodes-2": ["--num-nodes", "2"],
    "gpus-0": ["--gpus", "0"],  # CPU training: loops with a parallelism limit
}
_IR_TYPES = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", bool: "BOOLEAN"}
_IR_TYPES.update({dict: "STRUCT", list: "LIST"})


def ir_type(hint: Any) -> str | None:
    """The IR parameter type of a Python annotation (``list[int]`` -> LIST); None for anything else."""
    origin = typing.get_origin(hint) or hint
    return _IR_TYPES.get(origin) if isinstance(origin, type) else None


def item_type(hint: Any) -> str | None:
    """The IR type of a list's items, from its annotation; None when undeclared (a bare ``list``)."""
    args = typing.get_args(hint)
    return ir_type(args[0]) if typing.get_origin(hint) is list and args else None


def python_lists() -> dict[tuple[str, str], Any]:
    """The Python annotation of every list a loop may iterate: (IR component or "root", name) -> hint."""
    hints: dict[tuple[str, str], Any] = {}
    pipeline = build_pipeline().pipeline_func
    for name, hint in typing.get_type_hints(pipeline).items():
        hints["root", name] = hint
    for comp in vars(make_components("example.com/t:1")).values():
        hints[f"comp-{comp.component_spec.name}", "Output"] = typing.get_type_hints(comp.python_func).get(
            "return"
        )
    return hints


def _declared(component: dict[str, Any]) -> dict[str, str]:
    params = component.get("inputDefinitions", {}).get("parameters", {})
    return {name: p["parameterType"] for name, p in params.items()}


def _constant_ok(value: Any, wants: str) -> bool:
    """A constant's JSON kind against the consumer's type (resolve.go 2.17.0 lines 222-249), numbers
    of an integer input integral."""
    if isinstance(value, bool):
        return wants == "BOOLEAN"
    if isinstance(value, int | float):
        return wants == "NUMBER_DOUBLE" or (wants == "NUMBER_INTEGER" and float(value).is_integer())
    kinds = {str: "STRING", list: "LIST", dict: "STRUCT"}
    return kinds.get(type(value)) == wants


class IrGraph:
    """The compiled IR's DAGs and components, and where each parameter value comes from."""

    def __init__(self, spec: dict[str, Any], lists: dict[tuple[str, str], Any]) -> None:
        self.comps: dict[str, dict[str, Any]] = spec["components"]
        self.dags = {"root": spec["root"], **{n: c for n, c in self.comps.items() if "dag" in c}}
        self.lists = lists

    def tasks(self) -> typing.Iterator[tuple[str, str, dict[str, Any]]]:
        for dag_name, dag in self.dags.items():
            for task_name, task in dag["dag"]["tasks"].items():
                yield dag_name, task_name, task

    def producer_type(self, dag: str, source: dict[str, Any]) -> str:
        """The declared type of what feeds one task input: the DAG's input or an upstream output."""
        if "componentInputParameter" in source:
            return _declared(self.dags[dag])[source["componentInputParameter"]]
        out = source["taskOutputParameter"]
        producer = self.comps[self.dags[dag]["dag"]["tasks"][out["producerTask"]]["componentRef"]["name"]]
        return producer["outputDefinitions"]["parameters"][out["outputParameterKey"]]["parameterType"]

    def _parent(self, dag: str) -> tuple[str, dict[str, Any]]:
        """The DAG and task that run component ``dag`` (each loop component has exactly one)."""
        (found,) = [(d, t) for d, _, t in self.tasks() if t["componentRef"]["name"] == dag]
        return found

    def list_item_type(self, dag: str, source: dict[str, Any]) -> str | None:
        """The item type of the list ``source`` carries, traced to the pipeline parameter or the
        component output that made it, then read from its Python annotation."""
        if "taskOutputParameter" in source:
            out = source["taskOutputParameter"]
            ref = self.dags[dag]["dag"]["tasks"][out["producerTask"]]["componentRef"]["name"]
            return item_type(self.lists.get((ref, out["outputParameterKey"])))
        name = source["componentInputParameter"]
        if dag == "root":
            return item_type(self.lists.get(("root", name)))
        parent_dag, parent_task = self._parent(dag)
        return self.list_item_type(parent_dag, parent_task["inputs"]["parameters"][name])

    def input_violations(self, dag: str, task_name: str, task: dict[str, Any]) -> list[str]:
        wants = _declared(self.comps[task["componentRef"]["name"]])
        problems = []
        for name, source in task.get("inputs", {}).get("parameters", {}).items():
            where = f"{dag}/{task_name}.{name}"
            if name not in wants:
                problems.append(f"{where}: the component declares no such input")
            elif "runtimeValue" in source:
                value = source["runtimeValue"]["constant"]
                if not _constant_ok(value, wants[name]):
                    problems.append(f"{where}: constant {value!r} for a {wants[name]} input")
            elif {"componentInputParameter", "taskOutputParameter"} & source.keys():
                got = self.producer_type(dag, source)
                if got != wants[name]:
                    problems.append(f"{where}: a {got} value for a {wants[name]} input")
            else:
                problems.append(f"{where}: unchecked source {sorted(source)}")
        return problems

    def loop_violations(self, dag: str, task_name: str, task: dict[str, Any]) -> list[str]:
        iterator = task.get("parameterIterator")
        if iterator is None:
            return []
        declared = _declared(self.comps[task["componentRef"]["name"]])[iterator["itemInput"]]
        items = iterator["items"]
        if "raw" in items:
            got = ir_type(type(json.loads(items["raw"])[0]))
        else:
            got = self.list_item_type(dag, task["inputs"]["parameters"][items["inputParameter"]])
        if got == declared:
            return []
        return [f"{dag}/{task_name}: items of type {got or 'undeclared (bare list)'} iterated as {declared}"]

    def violations(self) -> list[str]:
        problems = []
        for dag, name, task in self.tasks():
            problems += self.input_violations(dag, name, task)
            problems += self.loop_violations(dag, name, task)
        return problems


@pytest.fixture(scope="module")
def lists() -> dict[tuple[str, str], Any]:
    return python_lists()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    assert main(["pipeline", "compile", "-o", str(out), *VARIANTS[request.param]]) == 0
    return next(yaml.safe_load_all(out.read_text()))


def test_every_task_input_passes_the_drivers_type_check(
    compiled: dict[str, Any], lists: dict[tuple[str, str], Any]
) -> None:
    assert IrGraph(compiled, lists).violations() == []


def test_loop_items_are_typed_as_their_lists_items(compiled: dict[str, Any]) -> None:
    """The evaluate and baseline loops hand each task an integer student number."""
    items = {
        p: t
        for c in compiled["components"].values()
        for p, t in _declared(c).items()
        if p.endswith("-loop-item")
    }
    assert items and set(items.values()) == {"NUMBER_INTEGER"}, items


def _annotated_lists() -> dict[str, Any]:
    pipeline = build_pipeline().pipeline_func
    found = {f"pipeline.{n}": h for n, h in typing.get_type_hints(pipeline).items()}
    for comp in vars(make_components("example.com/t:1")).values():
        func: Callable[..., Any] = comp.python_func
        found.update({f"{func.__name__}.{n}": h for n, h in typing.get_type_hints(func).items()})
    return {name: hint for name, hint in found.items() if ir_type(hint) == "LIST"}


def test_every_list_parameter_declares_its_item_type() -> None:
    """The whole kind: a bare ``list`` anywhere would compile to STRING items the day a loop uses it."""
    lists = _annotated_lists()
    assert "pipeline.baseline_students" in lists
    assert {name: hint for name, hint in lists.items() if not typing.get_args(hint)} == {}


def test_the_rule_catches_a_string_typed_loop_item() -> None:
    """The checker itself: the IR today's bare ``list`` made (items typed STRING) is refused."""
    spec = {
        "root": {
            "inputDefinitions": {"parameters": {"xs": {"parameterType": "LIST"}}},
            "dag": {
                "tasks": {
                    "loop": {
                        "componentRef": {"name": "comp-loop"},
                        "inputs": {"parameters": {"p-xs": {"componentInputParameter": "xs"}}},
                        "parameterIterator": {"itemInput": "p-item", "items": {"inputParameter": "p-xs"}},
                    }
                }
            },
        },
        "components": {
            "comp-loop": {
                "inputDefinitions": {
                    "parameters": {"p-xs": {"parameterType": "LIST"}, "p-item": {"parameterType": "STRING"}}
                },
                "dag": {
                    "tasks": {
                        "use": {
                            "componentRef": {"name": "comp-use"},
                            "inputs": {"parameters": {"n": {"componentInputParameter": "p-item"}}},
                        }
                    }
                },
            },
            "comp-use": {"inputDefinitions": {"parameters": {"n": {"parameterType": "NUMBER_INTEGER"}}}},
        },
    }
    assert IrGraph(spec, {("root", "xs"): list}).violations() == [
        "root/loop: items of type undeclared (bare list) iterated as STRING",
        "comp-loop/use.n: a STRING value for a NUMBER_INTEGER input",
    ]
    assert IrGraph(spec, {("root", "xs"): list[int]}).violations()[0] == (
        "root/loop: items of type NUMBER_INTEGER iterated as STRING"
    )
