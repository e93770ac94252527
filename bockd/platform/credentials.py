"""The environment variables that carry credentials: the keys of the S3 and MLflow Kubernetes Secrets.

On a cluster each key of a Secret reaches a pod as the variable of the same name (KFP tasks through
``kubernetes.use_secret_as_env``, TrainJob ranks through ``secretKeyRef``); locally ``bockd services`` sets
them. They are read from the environment only, never passed as parameters, so no log or compiled
pipeline holds a value.
"""

from __future__ import annotations

ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
# Every key the S3 Secret must hold (manifests/base/secrets.yaml, bockd-s3).
S3_SECRET_KEYS = (ACCESS_KEY_ID, SECRET_ACCESS_KEY)
# Optional keys of the MLflow Secret (bockd-mlflow): a tracking server behind basic auth or a token; the
# MLflow client reads them from the environment itself.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SECRET_KEYS = frozenset({*S3_SECRET_KEYS, *MLFLOW_SECRET_KEYS})
