"""deploy: the selected students behind KServe endpoints (InferenceServices, or local model servers)."""

from typing import Any

from kfp.dsl import Artifact, Input, Model, Output


def deploy(
    model: Input[Model],
    selection: Input[Artifact],
    registrations: Input[Artifact],
    deploy_mode: str,
    local_serving_dir: str,
    serving_namespace: str,
    deploy_options: dict[str, Any],
    mlflow_tracking_uri: str,
    mlflow_artifacts_destination: str,
    endpoints: Output[Artifact],
) -> list[dict[str, Any]]:
    """Returns one record per deployed student: name, version, url."""
    import json

    from bockd.steps import deploy as run

    with open(selection.path) as f:
        chosen = json.load(f)["chosen"]
    with open(registrations.path) as f:
        registered = json.load(f)
    cluster = {
        **deploy_options,
        "namespace": serving_namespace,
        "tracking_uri": mlflow_tracking_uri,
        "artifacts_destination": mlflow_artifacts_destination,
    }
    records = run(
        model.path,
        chosen,
        registered,
        mode=deploy_mode,
        serving_dir=local_serving_dir,
        cluster_options=cluster,
    )
    with open(endpoints.path, "w") as f:
        json.dump(records, f, indent=2)
    endpoints.metadata["urls"] = {r["name"]: r["url"] for r in records}
    return records
