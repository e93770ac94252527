"""The embedded local stack: a SeaweedFS S3 store and an MLflow tracking server on 127.0.0.1.

``up`` starts both (health-checked) and records PIDs and ports in ``<state>/services.json``; ``down``
stops them by those PIDs; ``status`` reports each one. See docs/services.md.
"""

from bockd.services.errors import ServiceError
from bockd.services.stack import (
    DEFAULT_STATE_DIR,
    LocalServices,
    ServicesStatus,
    ServiceState,
    down,
    mlflow_argv,
    status,
    up,
    weed_argv,
)
from bockd.services.state import BUCKET, Credentials, ServiceRecord, ServicesInfo

__all__ = [
    "BUCKET",
    "DEFAULT_STATE_DIR",
    "Credentials",
    "LocalServices",
    "ServiceError",
    "ServiceRecord",
    "ServiceState",
    "ServicesInfo",
    "ServicesStatus",
    "down",
    "mlflow_argv",
    "status",
    "up",
    "weed_argv",
]
