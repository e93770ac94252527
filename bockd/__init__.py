"""bockd: online ensemble model compression (BOC-KD) for Kubeflow.

One package in layers, each importing only the ones below it (docs/architecture.md; ``make imports``
checks it): the method core (``bockd.models``, ``bockd.data``, ``bockd.losses``, ``bockd.engine``,
``bockd.config``, ``bockd.export``, ``bockd.evaluate``, ...) <- the model server (``bockd.serving``) <-
the platform (``bockd.platform``: S3, MLflow, Kubernetes, local services) <- the pipeline
(``bockd.pipeline``, ``bockd.components``) <- the command line (``bockd.cli``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
