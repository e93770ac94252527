"""Validate a Kubernetes custom resource against its CRD's ``openAPIV3Schema``, offline.

There is no API server to dry-run against, so generated InferenceServices (and the manifests' other custom
resources) are checked against the real CRD files (the tests vendor them in ``tests/crds``). A CRD schema
is OpenAPI v3, close to JSON Schema draft 4, plus ``x-kubernetes-*`` extensions that jsonschema does not
know; they are translated here:

- ``x-kubernetes-int-or-string: true``: integer or string (an ``anyOf`` is added when the CRD has none);
- ``x-kubernetes-preserve-unknown-fields: true``: any field is allowed in that object;
- ``nullable: true``: null is allowed too;
- ``metadata`` is ``type: object`` only (the API server checks it itself): a name is checked here.

``strict=True`` (the default) rejects fields the schema does not declare, as ``kubectl`` does with its
default ``--validate=strict`` (the API server would otherwise prune them silently, so a typo such as
``canaryTrafficPercentage`` would deploy without its canary). jsonschema is imported on first use.

`prune_unknown_fields` is what the API server does instead with a custom resource written without strict
field validation: it drops every field the structural schema does not declare, except under
``x-kubernetes-preserve-unknown-fields: true`` (``apiVersion``, ``kind`` and ``metadata`` are always kept),
and stores the rest (KEP-2332 "Pruning for Custom Resources", GA in apiextensions.k8s.io/v1;
https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#field-pruning).
With ``fieldValidation=Strict`` the same fields make the request fail instead (HTTP 400, `strict_error`).
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


def prune_unknown_fields(obj: dict[str, Any], crd_path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """`prune` against the schema of the CRD in ``crd_path`` (the version ``obj["apiVersion"]`` names)."""
    return prune(obj, crd_schema(crd_path, str(obj.get("apiVersion", "")).rpartition("/")[2]))


def prune(obj: dict[str, Any], schema: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(``obj`` without the fields ``schema`` (an ``openAPIV3Schema``) does not declare, their paths).

    Paths read like the API server's: ``spec.canary``, ``spec.containers[0].foo``. ``apiVersion``,
    ``kind`` and ``metadata`` are kept.
    """
    dropped: list[str] = []
    kept = ("apiVersion", "kind", "metadata")
    pruned = {
        key: value if key in kept else _prune(value, _field(schema, key), key, dropped)
        for key, value in obj.items()
        if key in kept or _field(schema, key) is not None
    }
    dropped += [key for key in obj if key not in pruned]
    return pruned, sorted(dropped)


def strict_error(kind: str, version: str, dropped: list[str]) -> str:
    """The message of the API server's HTTP 400 for unknown fields under ``fieldValidation=Strict``."""
    fields = ", ".join(f'unknown field "{path}"' for path in dropped)
    return f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: {fields}'


def _field(schema: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The schema of field ``key`` of an object schema; None when the field is unknown there."""
    if key in (schema.get("properties") or {}):
        return schema["properties"][key]
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        return extra
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return {"x-kubernetes-preserve-unknown-fields": True}
    return None


def _prune(value: Any, schema: dict[str, Any] | None, path: str, dropped: list[str]) -> Any:
    if schema is None:
        return value
    if isinstance(value, list):
        item = schema.get("items") or {"x-kubernetes-preserve-unknown-fields": True}
        return [_prune(v, item, f"{path}[{i}]", dropped) for i, v in enumerate(value)]
    if not isinstance(value, dict) or schema.get("x-kubernetes-int-or-string"):
        return value
    shapeless = "properties" not in schema and "additionalProperties" not in schema
    if shapeless and (schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("type") != "object"):
        return value  # an object kept whole
    out = {}
    for key, sub in value.items():
        field_schema = _field(schema, key)
        if field_schema is None:
            dropped.append(f"{path}.{key}")
        else:
            out[key] = _prune(sub, field_schema, f"{path}.{key}", dropped)
    return out


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
