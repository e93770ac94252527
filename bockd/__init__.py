"""bockd: online ensemble model compression (BOC-KD) for Kubeflow."""

__version__ = "0.1.0"
