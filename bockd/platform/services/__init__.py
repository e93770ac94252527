"""What stands in for the cluster on one machine, all on 127.0.0.1: a SeaweedFS S3 store and an MLflow
tracking server (the embedded stack), and KServe model servers (what the deploy step starts locally).

``up`` starts the stack (health-checked) and records PIDs and ports in ``<state>/services.json``; ``down``
stops it by those PIDs; ``status`` reports each one (docs/services.md). ``start_local_server`` runs a model
server (`model_servers`). Every process is stopped only while its command line is still ours (`processes`).
"""

from bockd.platform.services.errors import ServiceError
from bockd.platform.services.model_servers import (
    LocalEndpoint,
    list_local_servers,
    start_local_server,
    stop_all_local_servers,
    stop_local_server,
)
from bockd.platform.services.stack import (
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
from bockd.platform.services.state import BUCKET, Credentials, ServiceRecord, ServicesInfo

__all__ = [
    "BUCKET",
    "DEFAULT_STATE_DIR",
    "Credentials",
    "LocalEndpoint",
    "LocalServices",
    "ServiceError",
    "ServiceRecord",
    "ServiceState",
    "ServicesInfo",
    "ServicesStatus",
    "down",
    "list_local_servers",
    "mlflow_argv",
    "start_local_server",
    "status",
    "stop_all_local_servers",
    "stop_local_server",
    "up",
    "weed_argv",
]
