"""Launch the ensemble's training as a Kubeflow Trainer TrainJob: stage, run, fetch, clean up.

What the ``train_distributed`` KFP component calls. It needs no GPU itself: the TrainJob's nodes train
(``torchrun --module bockd.pipeline.trainjob_worker``), this process stages the inputs in S3, watches the
TrainJob and fetches what rank 0 uploaded.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from bockd.config import build_config
from bockd.errors import BockdError
from bockd.platform.kube.client import pod_namespace
from bockd.platform.s3 import (
    delete_prefix,
    download_prefix,
    endpoint_from_env,
    get_json,
    put_json,
    upload_folder,
)
from bockd.platform.trainjob.request import (
    DATASET_PREFIX,
    MODEL_PREFIX,
    REQUEST_FILE,
    RESULT_FILE,
    TrainRequest,
    staging_prefix,
)
from bockd.platform.trainjob.spec import TrainJobError, TrainJobSpec
from bockd.platform.trainjob.watch import TrainJobApi, run_trainjob

LOG = logging.getLogger("bockd.trainjob")

# Plain variables the launcher passes on from its own environment when set.
FORWARDED_ENV = ("MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def train_distributed(
    raw_config: dict[str, Any],
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    staging_uri: str,
    image: str,
    namespace: str = "",
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    tracking_uri: str = "",
    experiment: str = "bockd",
    pipeline_run_id: str = "",
    checkpoint_uri: str = "",
    tags: dict[str, str] | None = None,
    api: TrainJobApi | None = None,
    timeout_s: float = 24 * 3600,
    poll_s: float = 30,
    cleanup: bool = True,
    **spec_options: Any,
) -> dict[str, Any]:
    """Stage the dataset and request, run the TrainJob, fetch the Model folder into ``out_dir``.

    Returns rank 0's ``result.json``: what the ``train_ensemble`` step returned on rank 0 (a JSON object).
    ``spec_options`` are further `TrainJobSpec` fields (tolerations, node_selector, secrets, env, ...).
    The TrainJob also carries ``timeout_s`` as its activeDeadlineSeconds, so the cluster stops it even
    when this launcher is gone. ``cleanup``: once the Model folder is here, delete the finished TrainJob
    and everything under the run's staging prefix (the dataset copy can be large); a failed run keeps its
    staging objects, since a retry uploads over them.
    """
    build_config(None, {**raw_config, "mode": "ensemble"})  # a bad config fails here, not on every node
    stage = staging_prefix(staging_uri, pipeline_run_id)
    request = TrainRequest(
        train_config=raw_config,
        data_uri=f"{stage}/{DATASET_PREFIX}/",
        output_uri=stage,
        tracking_uri=tracking_uri,
        experiment=experiment,
        pipeline_run_id=pipeline_run_id,
        checkpoint_uri=checkpoint_uri,
        tags=dict(tags or {}),
    )
    env = dict(spec_options.pop("env", {}) or {})
    endpoint = endpoint_from_env()
    if endpoint:
        env.setdefault("BOCKD_S3_ENDPOINT", endpoint)
    for name in FORWARDED_ENV:  # where MLflow's client finds S3 when the server does not proxy artifacts
        if os.environ.get(name):
            env.setdefault(name, os.environ[name])
    spec_options.setdefault("active_deadline_seconds", max(1, math.ceil(timeout_s)))
    spec = TrainJobSpec.for_run(
        pipeline_run_id or "local",
        pod_namespace(namespace),
        image,
        f"{stage}/{REQUEST_FILE}",
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        env=env,
        **spec_options,
    )
    api = api or TrainJobApi.from_config()
    upload_folder(data_dir, request.data_uri)
    put_json(spec.request_uri, request.to_dict())
    run_trainjob(api, spec, timeout_s=timeout_s, poll_s=poll_s)
    try:
        result = get_json(f"{stage}/{RESULT_FILE}")
    except Exception as e:
        raise TrainJobError(
            f"TrainJob {spec.namespace}/{spec.name} completed but rank 0 left no {stage}/{RESULT_FILE}: {e}"
        ) from e
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="bockd-fetch-") as tmp:
        fetched = download_prefix(f"{stage}/{MODEL_PREFIX}/", Path(tmp) / MODEL_PREFIX)
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in fetched.rglob("*") if p.is_file()):
            target = out / path.relative_to(fetched)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
    if cleanup:
        try:  # the trained model is safe by now: a failed cleanup is worth a warning, not a failed step
            api.delete(spec.namespace, spec.name)
            removed = delete_prefix(stage)
        except BockdError as e:
            LOG.warning("cleanup after TrainJob %s/%s failed: %s", spec.namespace, spec.name, e)
        else:
            LOG.info("TrainJob %s/%s and %d staging object(s) deleted", spec.namespace, spec.name, removed)
    return result
