"""Validate a Kubernetes custom resource against its CRD's ``openAPIV3Schema``, offline.

There is no API server to dry-run against, so generated InferenceServices (and the manifests' other custom
resources) are checked against the real CRD files in ``shared/schemas``. A CRD schema is OpenAPI v3, close
to JSON Schema draft 4, plus ``x-kubernetes-*`` extensions that jsonschema does not know; they are
translated here:

- ``x-kubernetes-int-or-string: true``: integer or string (an ``anyOf`` is added when the CRD has none);
- ``x-kubernetes-preserve-unknown-fields: true``: any field is allowed in that object;
- ``nullable: true``: null is allowed too;
- ``metadata`` is ``type: object`` only (the API server checks it itself): a name is checked here.

``strict=True`` (the default) rejects fields the schema does not declare, as ``kubectl`` does with its
default ``--validate=strict`` (the API server would otherwise prune them silently, so a typo such as
``canaryTrafficPercentage`` would deploy without its canary). jsonschema is imported on first use.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml

from bockd.errors import BockdError

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_MAX_ERRORS = 20


class CrdValidationError(BockdError, ValueError):
    """A resource does not match its CRD: wrong apiVersion or kind, or fields that break the schema."""


def validate_against_crd(obj: dict[str, Any], crd_path: str | Path, strict: bool = True) -> None:
    """Raise `CrdValidationError` listing every violation of ``obj`` against the CRD in ``crd_path``.

    The schema is that of the served version named by ``obj["apiVersion"]``; ``kind`` must be the CRD's.
    """
    crd = _load_crd(str(crd_path))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    api_version = obj.get("apiVersion", "")
    obj_group, _, version = str(api_version).rpartition("/")
    if obj_group != group:
        raise CrdValidationError(f"apiVersion {api_version!r}: the CRD {crd_path} is for group {group!r}")
    if obj.get("kind") != kind:
        raise CrdValidationError(f"kind {obj.get('kind')!r}: the CRD {crd_path} defines {kind!r}")
    validator = _validator(str(crd_path), version, strict)
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]
    problems += _metadata_problems(obj.get("metadata"))
    if problems:
        shown = "\n  ".join(problems[:_MAX_ERRORS])
        more = f"\n  ... and {len(problems) - _MAX_ERRORS} more" if len(problems) > _MAX_ERRORS else ""
        raise CrdValidationError(f"{kind} {_name(obj)!r} does not match {crd_path}:\n  {shown}{more}")


def served_versions(crd_path: str | Path) -> list[str]:
    """The versions the CRD serves, in its order."""
    return [v["name"] for v in _load_crd(str(crd_path))["spec"]["versions"] if v.get("served")]


def crd_schema(crd_path: str | Path, version: str) -> dict[str, Any]:
    """The raw ``openAPIV3Schema`` of a served version (for tests that look up a field)."""
    for v in _load_crd(str(crd_path))["spec"]["versions"]:
        if v["name"] == version and v.get("served"):
            return v["schema"]["openAPIV3Schema"]
    raise CrdValidationError(
        f"{crd_path} serves no version {version!r} (served: {served_versions(crd_path)})"
    )


@functools.lru_cache(maxsize=16)
def _load_crd(path: str) -> dict[str, Any]:
    # The KServe CRD is ~2 MB of YAML: the C loader reads it in a fraction of the pure-Python time.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, encoding="utf-8") as f:
            crd = yaml.load(f, Loader=loader)  # a safe loader, C-accelerated
    except OSError as e:
        raise CrdValidationError(f"cannot read the CRD {path}: {e}") from e
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise CrdValidationError(f"{path} is not a CustomResourceDefinition")
    return crd


@functools.lru_cache(maxsize=32)
def _validator(path: str, version: str, strict: bool) -> Any:
    import jsonschema  # only the validation needs it

    schema = _to_json_schema(copy.deepcopy(crd_schema(path, version)), strict)
    return jsonschema.Draft4Validator(schema)


def _to_json_schema(node: Any, strict: bool) -> Any:
    """Translate the ``x-kubernetes-*`` and ``nullable`` markers into plain JSON Schema, recursively."""
    if isinstance(node, list):
        return [_to_json_schema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            # a map of field names to schemas: translate the schemas, never read the names as keywords
            out[key] = {name: _to_json_schema(sub, strict) for name, sub in value.items()}
        elif key in ("enum", "default", "example", "required"):
            out[key] = value  # data, not schemas
        else:
            out[key] = _to_json_schema(value, strict)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    open_object = out.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out
    if strict and out.get("type") == "object" and "properties" in out and not open_object:
        out["additionalProperties"] = False
    return out


def _metadata_problems(meta: Any) -> list[str]:
    if not isinstance(meta, dict):
        return ["metadata: must be an object"]
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return ["metadata.name: required"]
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        return [f"metadata.name: {name!r} is not a DNS-1123 subdomain"]
    problems = []
    for key in ("labels", "annotations"):
        values = meta.get(key) or {}
        problems += [
            f"metadata.{key}.{k}: must be a string" for k, v in values.items() if not isinstance(v, str)
        ]
    return problems


def _json_path(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "$" + "".join(parts)


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("name", "?")) if isinstance(meta, dict) else "?"
