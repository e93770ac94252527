"""Kubernetes plumbing every resource kind shares.

- `client`: the client configuration, the pod's own namespace, `CustomResourceApi` (get / create / patch /
  delete with strict field validation) and `KubeApiError` with the HTTP status;
- `names`: one check each for object names, namespaces, label values and quantities;
- `crd`: offline validation (and the API server's pruning) of a custom resource against its CRD's schema.
"""

from bockd.platform.kube.client import CustomResourceApi, KubeApiError, load_kube_config, pod_namespace
from bockd.platform.kube.crd import CrdValidationError, prune_unknown_fields, validate_against_crd
from bockd.platform.kube.names import (
    check_dns_1035_name,
    check_namespace,
    check_quantity,
    dns_1035_name,
    is_label_value,
)

__all__ = [
    "CrdValidationError",
    "CustomResourceApi",
    "KubeApiError",
    "check_dns_1035_name",
    "check_namespace",
    "check_quantity",
    "dns_1035_name",
    "is_label_value",
    "load_kube_config",
    "pod_namespace",
    "prune_unknown_fields",
    "validate_against_crd",
]
