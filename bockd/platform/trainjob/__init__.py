"""Multi-node, multi-GPU training of the ensemble: a Kubeflow Trainer TrainJob (trainer.kubeflow.org).

The launcher (the ``train_distributed`` KFP component, or `train_distributed` in `launcher`) stages the
prepared dataset and a JSON request in S3, creates one TrainJob on the ``torch-distributed``
ClusterTrainingRuntime, waits for it, and fetches the Model folder rank 0 uploaded. What it writes:

- ``spec.runtimeRef``: ``{name: torch-distributed, kind: ClusterTrainingRuntime}``.
- ``spec.trainer``: ``image``, ``command: [torchrun]``,
  ``args: [--module, bockd.pipeline.trainjob_worker, --request, s3://.../request.json]``, ``numNodes``,
  ``numProcPerNode`` (= GPUs per node; 1 on CPU),
  ``resourcesPerNode`` (cpu/memory requests, ``nvidia.com/gpu`` limit) and ``env``: plain values plus the
  S3 (and optional MLflow) credentials as ``valueFrom.secretKeyRef`` (secret names, never values). The
  Trainer's torch plugin sets ``PET_NNODES``/``PET_NPROC_PER_NODE``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/
  ``PET_MASTER_PORT``, which torchrun reads as its defaults; torchrun then sets ``WORLD_SIZE``/``RANK``/
  ``LOCAL_RANK``/``MASTER_ADDR`` for each process.
- ``spec.runtimePatches`` (this CRD has no ``podSpecOverrides``/``podTemplateOverrides``): one patch,
  manager ``bockd.io/launcher``, on replicated job ``node`` (the torch-distributed runtime's only job, its
  container also named ``node``): ``nodeSelector``, ``tolerations``, a memory-backed ``emptyDir`` volume
  mounted at ``/dev/shm`` (the default 64 MiB starves DataLoader workers and NCCL). Trainer's webhook admits
  a patch only on jobs and containers the runtime has and without env on the ``node`` container, and a
  domain-prefixed manager (kubeflow/trainer v2.2.0 ``pkg/runtime/framework/plugins/jobset/jobset.go``
  Validate, L127-161); the ``PET_*`` variables are the torch plugin's (``plugins/torch/torch.go`` L56-80),
  so ``env`` may not set them.

``runtimePatches`` and ``activeDeadlineSeconds`` exist from Kubeflow Trainer 2.2 (absent from the v2.1.0
TrainJob CRD): on an older Trainer the API server refuses the unknown fields (bockd asks for strict field
validation) and `TrainJobError` says which version is needed.

Conditions (the Trainer controller's, kubeflow/trainer v2.2.0 ``pkg/apis/trainer/v1alpha1/trainjob_types.go``
L56-65): ``Suspended``, ``Complete``, ``Failed`` (``Complete``/``Failed`` copied from the JobSet's,
``jobset.go`` Status L328-347; ``Failed`` with reason ``DeadlineExceeded`` past ``activeDeadlineSeconds``,
``pkg/controller/trainjob_controller.go`` reconcileDeadline L171-201). A TrainJob held ``Suspended`` (e.g. by
Kueue, waiting for quota) is waited for like a running one.
:func:`run_trainjob` logs each change once, returns on ``Complete``, and deletes the TrainJob on
``Failed`` (raising `TrainJobError` with reason and message), on timeout, and on cancellation
(KeyboardInterrupt, or SIGTERM, which KFP sends the launcher pod when the run is cancelled: re-raised).
A retried launcher finds the TrainJob of its first attempt by name and watches it (one that already
failed is deleted and created anew; one with another spec, found through the ``bockd.io/spec-sha256``
annotation, is refused: Trainer's webhook stamps ``runtimePatches[].time`` on create, ``pkg/webhooks/
trainjob_webhook.go`` L60-68, so the stored spec is never compared with the built one).
``spec.activeDeadlineSeconds`` (the launcher's timeout) stops the TrainJob even when the launcher pod is
gone. After a success the launcher fetches the Model folder, then
deletes the TrainJob and the run's staging objects.

Worker side (``torchrun --module bockd.pipeline.trainjob_worker --request <uri>`` on every process; a program
of the pipeline layer, since it runs the ``train_ensemble`` step): each rank downloads
the dataset and trains; rank 0 (``RANK`` unset counts as 0) also logs to MLflow, uploads checkpoints,
exports the students and uploads the Model folder and ``result.json`` (written last: the completion mark).

Modules: `spec` (`TrainJobSpec` and the custom resource built from it), `watch` (the API calls and the wait
for ``Complete``), `request` (`TrainRequest`, what the launcher hands every rank through S3) and
`launcher` (`train_distributed`: stage, run, fetch, clean up).
"""

from bockd.platform.trainjob.launcher import train_distributed
from bockd.platform.trainjob.request import TrainRequest, staging_prefix
from bockd.platform.trainjob.spec import (
    TrainJobError,
    TrainJobSpec,
    build_trainjob,
    spec_digest,
    trainjob_name,
)
from bockd.platform.trainjob.watch import TrainJobApi, TrainJobResult, describe, run_trainjob

__all__ = [
    "TrainJobApi",
    "TrainJobError",
    "TrainJobResult",
    "TrainJobSpec",
    "TrainRequest",
    "build_trainjob",
    "describe",
    "run_trainjob",
    "spec_digest",
    "staging_prefix",
    "train_distributed",
    "trainjob_name",
]
