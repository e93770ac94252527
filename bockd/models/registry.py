"""timm-style model registry: ``@register_model`` on builders, ``create_model`` by name."""

from collections.abc import Callable
from typing import Any

import torch

from bockd.errors import ConfigError
from bockd.models.blueprint import Blueprint
from bockd.models.ensemble import BranchedEnsemble, Student, count_parameters
from bockd.models.initialization import init_weights
from bockd.models.widths import width_multiplier

# A builder takes (num_classes, in_channels, num_students) as keywords and returns a Blueprint.
ModelBuilder = Callable[..., Blueprint]

_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a builder under ``name`` (must be unique)."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ConfigError(f"name: model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_MODELS)


def _positive_int(argument: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{argument}: expected an integer >= {minimum}, got {value!r}")


def _blueprint(arch: str, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    """Validate every argument (naming it in the error) and return the architecture's blueprint."""
    if arch not in _MODELS:
        raise ConfigError(f"arch: unknown architecture {arch!r}; expected one of: {', '.join(list_models())}")
    _positive_int("num_classes", num_classes, 2)
    _positive_int("in_channels", in_channels, 1)
    _positive_int("num_students", num_students, 2)
    blueprint = _MODELS[arch](num_classes=num_classes, in_channels=in_channels, num_students=num_students)
    if num_students > blueprint.max_students:
        raise ConfigError(
            f"num_students: {arch} supports at most {blueprint.max_students} students "
            f"(more would leave the narrowest branch with 0 channels), got {num_students}"
        )
    return blueprint


def _spec(arch: str, num_classes: int, in_channels: int, num_students: int) -> dict[str, Any]:
    return {
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "num_students": num_students,
    }


def create_model(
    arch: str, *, num_classes: int = 10, in_channels: int = 3, num_students: int = 5
) -> BranchedEnsemble:
    """Build a freshly initialized ensemble; ``create_model(**ensemble.spec)`` rebuilds the same shape."""
    blueprint = _blueprint(arch, num_classes, in_channels, num_students)
    base = init_weights(blueprint.make_base())
    branches = [init_weights(blueprint.make_branch(i)) for i in range(num_students)]
    return BranchedEnsemble(base, branches, spec=_spec(arch, num_classes, in_channels, num_students))


def build_student(arch: str, *, num_classes: int, in_channels: int, num_students: int, index: int) -> Student:
    """A fresh standalone student with the shape of ``create_model(...).extract_student(index)``.

    Used to rebuild an exported student before loading its weights: ``build_student(**student.spec)``.
    """
    blueprint = _blueprint(arch, num_classes, in_channels, num_students)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_students:
        raise ConfigError(
            f"index: expected a student index in 0..{num_students - 1} (0-based, 0 = S1), got {index!r}"
        )
    base = init_weights(blueprint.make_base())
    branch = init_weights(blueprint.make_branch(index))
    spec = {**_spec(arch, num_classes, in_channels, num_students), "index": index}
    return Student(base, branch, spec)


def student_table(
    arch: str, *, num_classes: int = 10, in_channels: int = 3, num_students: int = 5
) -> list[dict[str, Any]]:
    """One row per student: label, index, nominal width multiplier, parameter count, size in % of S1."""
    blueprint = _blueprint(arch, num_classes, in_channels, num_students)
    # Shapes are all that counting needs: the meta device allocates no memory and draws no random numbers.
    with torch.device("meta"):
        base_params = count_parameters(blueprint.make_base())
        params = [base_params + count_parameters(blueprint.make_branch(i)) for i in range(num_students)]
    return [
        {
            "student": f"S{i + 1}",
            "index": i,
            "width_multiplier": round(width_multiplier(i, num_students), 4),
            "params": count,
            "size_pct": round(100.0 * count / params[0], 2),
        }
        for i, count in enumerate(params)
    ]
