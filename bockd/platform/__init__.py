"""The platform layer: the outside systems the pipeline runs on, each behind one small module.

Imports the method core and the model server's errors, never the pipeline or the CLI (the layer rule,
``make imports``). Heavy clients (minio, mlflow, kubernetes, kserve) are imported by the module that talks
to them, so importing this package costs nothing.

- `s3`: S3 through the minio client (data sources, checkpoints, staging), credentials from the environment;
- `credentials`: the environment variables (the Kubernetes Secrets' keys) that carry them;
- `tracking`: the MLflow callback of a training run; `model_registry`: registered versions (students,
  their int8 versions, the cascade), ``@champion``;
- `kube`: the Kubernetes client, name and quantity checks, CRD validation;
- `inference_service`: one KServe InferenceService per model, rolled out by canary, rolled back on failure;
- `trainjob`: the Kubeflow Trainer TrainJob launcher (its worker is the pipeline's ``trainjob_worker``);
- `services`: the embedded stack of one machine (SeaweedFS S3, MLflow) and local KServe model servers;
- `serving_benchmark`: a student's latency and throughput measured through the real model server, and
  whether one variant (int8) is measurably faster than another (fp32);
- `polling`: the one poll-until loop every wait above uses.
"""

__all__ = [
    "credentials",
    "inference_service",
    "kube",
    "model_registry",
    "polling",
    "s3",
    "services",
    "serving_benchmark",
    "tracking",
    "trainjob",
]
