"""prepare_data: the data source (archive, folder, s3:// prefix, digits) -> a Dataset artifact."""

from typing import Any

from kfp.dsl import Dataset, Output


def prepare_data(train_config: dict[str, Any], dataset: Output[Dataset]) -> str:
    """Uint8 arrays per split + meta.json (classes, counts, mean/std, sha256). Returns the sha256."""
    from bockd.pipeline.steps import prepare_data as run

    meta = run(train_config, dataset.path)
    dataset.metadata.update({key: meta[key] for key in ("name", "counts", "image_shape", "sha256")})
    dataset.metadata["num_classes"] = len(meta["classes"])
    return meta["sha256"]
