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
    """Returns one record per deployed student: student, registered_model, version, url."""
    from bockd.pipeline.records import Endpoints, Registrations, SelectionRecord
    from bockd.pipeline.steps import ClusterTarget
    from bockd.pipeline.steps import deploy as run

    served = run(
        model.path,
        SelectionRecord.read(selection.path).chosen,
        Registrations.read(registrations.path).registrations,
        mode=deploy_mode,
        serving_dir=local_serving_dir,
        cluster=ClusterTarget(serving_namespace, mlflow_tracking_uri, mlflow_artifacts_destination),
        deploy_options=deploy_options,
    )
    Endpoints(endpoints=served).write(endpoints.path)
    endpoints.metadata["urls"] = {e.registered_model: e.url for e in served}
    return [e.model_dump(mode="json") for e in served]
