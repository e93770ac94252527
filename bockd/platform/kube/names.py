"""Kubernetes names, label values and quantities: one check of each, shared by every resource bockd writes.

The rules are the API server's (k8s.io/apimachinery ``pkg/util/validation/validation.go``): a DNS-1035 label
(``IsDNS1035Label``: lower-case letters, digits and '-', starting with a letter, ending alphanumeric) for
object names that become Service and pod names, a DNS-1123 label (``IsDNS1123Label``) for namespaces, both at
most 63 characters, and a label value (``IsValidLabelValue``) of at most 63 characters. Quantities are parsed
by the Kubernetes client itself.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from bockd.errors import ConfigError

MAX_LABEL_LENGTH = 63
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def dns_1035_name(raw: str, max_length: int, what: str = "name") -> str:
    """A DNS-1035 label of at most ``max_length`` characters made from ``raw``: ``BOC-KD/Digits_S3`` ->
    ``boc-kd-digits-s3``.

    Every run of other characters becomes one '-'; a name that would start with a digit gains ``m-``. A
    longer name keeps its start and gains 8 hex digits of the SHA-256 of ``raw``, so two long names that
    differ only at the end stay distinct, and the same ``raw`` always gives the same name.
    `ConfigError` naming ``what`` when ``raw`` has no letter or digit.
    """
    name = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    if not name:
        raise ConfigError(f"{what} {raw!r}: no letters or digits to make a Kubernetes name of")
    if not name[0].isalpha():
        name = f"m-{name}"
    if len(name) > max_length:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[: max_length - 9].rstrip('-')}-{digest}"
    return name


def check_dns_1035_name(name: str, max_length: int, hint: str) -> None:
    """`ConfigError` unless ``name`` is a DNS-1035 label of at most ``max_length`` characters; ``hint`` says
    what makes a valid one."""
    if not isinstance(name, str) or len(name) > max_length or not DNS_1035_LABEL.match(name):
        raise ConfigError(
            f"name: {name!r} is not a DNS-1035 label of at most {max_length} characters "
            f"(lower-case letters, digits, '-', starting with a letter); {hint}"
        )


def check_namespace(namespace: str, field: str = "namespace") -> None:
    """`ConfigError` naming ``field`` unless ``namespace`` is a Kubernetes namespace name (DNS-1123 label)."""
    if (
        not isinstance(namespace, str)
        or len(namespace) > MAX_LABEL_LENGTH
        or not DNS_1123_LABEL.match(namespace)
    ):
        raise ConfigError(f"{field}: {namespace!r} is not a Kubernetes namespace name")


def is_label_value(value: Any) -> bool:
    """Whether ``value`` may be a label's value: a string of at most 63 characters, empty or alphanumeric at
    both ends with ``-``, ``_``, ``.`` between."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_LABEL_LENGTH
        and (not value or bool(LABEL_VALUE.match(value)))
    )


def check_quantity(value: Any, field: str) -> None:
    """A positive Kubernetes quantity (``2``, ``500m``, ``4Gi``), parsed by the Kubernetes client's own
    ``kubernetes.utils.parse_quantity``; `ConfigError` naming ``field`` otherwise."""
    from kubernetes.utils import parse_quantity

    try:
        ok = isinstance(value, str) and not any(c.isspace() for c in value) and parse_quantity(value) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{field}: {value!r} is not a positive Kubernetes quantity (e.g. 2, 500m, 4Gi)")
