"""Compile-time settings of the pipeline: images, the GPU node, the measuring node, secrets, retries (no
kfp import).

The keys the S3 and MLflow Secrets hold are `bockd.platform.credentials`' (the tasks see them under the same
names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PIPELINE_NAME = "bockd"
DEFAULT_TRAINER_IMAGE = "ghcr.io/bockd/bockd-trainer:0.1.0"
DEFAULT_SERVING_IMAGE = "ghcr.io/bockd/bockd-serving:0.1.0"  # the ServingRuntime's (manifests/)
# The object store Kubeflow Pipelines ships: SeaweedFS since KFP 2.16 removed MinIO (kubeflow/pipelines
# PR #12613), the Service seaweedfs in kubeflow with S3 on port 9000 (tag 2.16.0:
# manifests/kustomize/third-party/seaweedfs/base/seaweedfs/seaweedfs-service.yaml lines 6-7, 18-21;
# backend/src/v2/objectstore/config.go line 29). MinIO or any S3 is an override (--s3-endpoint).
DEFAULT_S3_ENDPOINT = "http://seaweedfs.kubeflow:9000"


@dataclass(frozen=True)
class GpuNode:
    """Where the training tasks run: one accelerator-bearing pod per task."""

    accelerator: str = "nvidia.com/gpu"
    count: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    toleration: str | None = "nvidia.com/gpu"  # taint key tolerated (operator Exists, effect NoSchedule)
    cpu_request: str = "8"
    memory_request: str = "32Gi"
    shm_size: str = "8Gi"  # memory-backed /dev/shm: the default 64 MiB starves PyTorch workers


@dataclass(frozen=True)
class MeasureNode:
    """Where the measure step runs: latency means something only on the kind of node that serves. The
    CPU is both request and limit, so the step's cgroup CPU limit (which the model server's ONNX Runtime
    threads follow, and which the measurement records) is a serving pod's with that limit."""

    cpu: str | None = None  # e.g. "2"; None: no request or limit (whatever node the pod lands on)
    memory: str = "4Gi"
    node_selector: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineSettings:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    gpu: GpuNode | None = field(default_factory=GpuNode)  # None: training on CPU (local runs)
    s3_secret: str | None = "bockd-s3"  # None: no Kubernetes secrets (local runs read the environment)
    mlflow_secret: str | None = "bockd-mlflow"
    s3_endpoint: str = DEFAULT_S3_ENDPOINT
    retries: int = 3
    # More than one node or GPU: training runs as a Kubeflow Trainer TrainJob (torchrun + DDP) that a
    # light launcher task creates and watches; its dataset copy, request and outputs go to staging_uri.
    num_nodes: int = 1
    staging_uri: str = "s3://bockd/staging"
    measure: MeasureNode = field(default_factory=MeasureNode)

    @property
    def distributed(self) -> bool:
        return self.gpu is not None and (self.num_nodes > 1 or self.gpu.count > 1)
