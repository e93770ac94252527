"""Serve a registered student on a cluster: one KServe InferenceService per model, rolled out safely.

- `spec`: `DeploySpec` (what to serve and how, validated) and the ISVC built from it;
- `api`: the Kubernetes calls (`InferenceServiceApi`) and the ServiceAccount pre-flight check;
- `status`: judges that read an ISVC's status (done, not yet, failed);
- `rollout`: `deploy_inference_service`: create, or canary -> promote, rolled back on failure.
"""

from bockd.platform.inference_service.api import (
    DeployError,
    InferenceServiceApi,
    check_service_account,
    load_kube_config,
)
from bockd.platform.inference_service.rollout import DeployResult, deploy_inference_service, served_version
from bockd.platform.inference_service.spec import (
    ANNOTATION_STABLE_URI,
    ANNOTATION_VERSION,
    BACKENDS,
    DEPLOYMENT_MODE_ANNOTATION,
    KNATIVE,
    LABEL_VERSION,
    STANDARD,
    DeploySpec,
    Resources,
    build_inference_service,
    normalize_mode,
    normalize_name,
)

__all__ = [
    "ANNOTATION_STABLE_URI",
    "ANNOTATION_VERSION",
    "BACKENDS",
    "DEPLOYMENT_MODE_ANNOTATION",
    "KNATIVE",
    "LABEL_VERSION",
    "STANDARD",
    "DeployError",
    "DeployResult",
    "DeploySpec",
    "InferenceServiceApi",
    "Resources",
    "build_inference_service",
    "check_service_account",
    "deploy_inference_service",
    "load_kube_config",
    "normalize_mode",
    "normalize_name",
    "served_version",
]
