"""deploy: the selected students behind KServe endpoints (InferenceServices, or local model servers), each
at its chosen precision; with ``deploy_options.cascade``, the fitted cascade behind one more."""

from typing import Any

from kfp.dsl import Artifact, Input, Model, Output


def deploy(
    model: Input[Model],
    quantized: Input[list[Model]],
    selection: Input[Artifact],
    registrations: Input[Artifact],
    cascade: Input[Model],
    deploy_mode: str,
    local_serving_dir: str,
    serving_namespace: str,
    deploy_options: dict[str, Any],
    mlflow_tracking_uri: str,
    mlflow_artifacts_destination: str,
    endpoints: Output[Artifact],
) -> list[dict[str, Any]]:
    """Returns one record per deployed student: student, registered_model, version, url, precision (the
    cascade's endpoint is in ``endpoints`` only)."""
    from bockd.pipeline.records import Endpoints, Registrations, SelectionRecord
    from bockd.pipeline.steps import ClusterTarget, deploy_cascade, read_quantized
    from bockd.pipeline.steps import deploy as run

    chosen = SelectionRecord.read(selection.path)
    registered = Registrations.read(registrations.path)
    target = ClusterTarget(serving_namespace, mlflow_tracking_uri, mlflow_artifacts_destination)
    served = run(
        model.path,
        chosen.chosen,
        registered.registrations,
        mode=deploy_mode,
        serving_dir=local_serving_dir,
        cluster=target,
        deploy_options=deploy_options,
        picks={p.student: p.precision for p in chosen.picks},
        int8_dirs={k: folder for k, (_, folder) in read_quantized([q.path for q in quantized]).items()},
    )
    one = deploy_cascade(
        cascade.path,
        registered.cascade,
        mode=deploy_mode,
        serving_dir=local_serving_dir,
        cluster=target,
        deploy_options=deploy_options,
    )
    Endpoints(endpoints=served, cascade=one).write(endpoints.path)
    endpoints.metadata["urls"] = {e.registered_model: e.url for e in served}
    if one is not None:
        endpoints.metadata["urls"][one.registered_model] = one.url
    return [e.model_dump(mode="json") for e in served]
