"""BOC-KD model zoo: branched ensembles (shared base + N branches) and the students cut from them.

Importing this package registers every architecture.
"""

from bockd.models import cifar_resnet, densenet, imagenet_resnet  # noqa: F401  (registers the models)
from bockd.models.ensemble import BranchedEnsemble, EnsembleOutput, Student
from bockd.models.registry import build_student, create_model, list_models, register_model, student_table

__all__ = [
    "BranchedEnsemble",
    "EnsembleOutput",
    "Student",
    "build_student",
    "create_model",
    "list_models",
    "register_model",
    "student_table",
]
