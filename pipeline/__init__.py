"""The bockd Kubeflow pipeline: its definition, local runs, compilation and cluster operations."""
