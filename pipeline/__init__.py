"""The bockd Kubeflow pipeline (installed as ``bockd.pipeline``): the steps and the DAG that runs them.

- `steps`: what each step does, as plain functions over folders (prepare -> train -> evaluate + quantize
  -> measure -> cascade -> register -> select -> report -> deploy); `records`: the typed records they
  hand each other; `selection`: the selection policy; `report`: the HTML report; `trainjob_worker`: the
  train step on each TrainJob rank;
- `pipeline`: the ``@dsl.pipeline`` over the KFP components (``bockd.components``); `parameters` and
  `settings`: its run parameters and compile-time settings; `options`: the quantization, measurement
  and cascade parameters;
- `local`: a whole run under ``kfp.local``; `summary`: what that run prints; `cluster`: submit, schedule
  and manage runs on a Kubeflow Pipelines API server; `cli`: ``bockd pipeline ...``.

Imports the platform layer, the model server and the method core; only the CLI imports it.
"""

__all__ = [
    "cli",
    "cluster",
    "local",
    "options",
    "parameters",
    "pipeline",
    "records",
    "report",
    "selection",
    "settings",
    "steps",
    "summary",
    "trainjob_worker",
]
