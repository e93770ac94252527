"""The TrainJob worker: ``torchrun --module bockd.pipeline.trainjob_worker --request <uri>`` runs it on
every process of a TrainJob that `bockd.platform.trainjob.launcher` created.

Each rank reads the `TrainRequest`, downloads the prepared dataset and trains (DDP under torchrun); rank 0
(``RANK`` unset counts as 0) runs the ``train_ensemble`` step whole: it logs to MLflow, uploads checkpoints,
exports the students, then uploads the Model folder and ``result.json`` (written last: the completion mark).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bockd.distributed import env_rank
from bockd.engine import train
from bockd.pipeline import steps
from bockd.pipeline.records import TrainingResult
from bockd.platform.s3 import download_prefix, get_json, put_json, upload_folder
from bockd.platform.trainjob.request import MODEL_PREFIX, RESULT_FILE, TrainRequest

LOG = logging.getLogger("bockd.trainjob")


def run_worker(request: TrainRequest) -> TrainingResult | None:
    """Train this process's share; rank 0 also exports and uploads. Returns rank 0's result (None on the
    other ranks); ``result.json`` holds it as JSON (`TrainingResult`)."""
    me = env_rank()
    with tempfile.TemporaryDirectory(prefix="bockd-worker-") as tmp:
        data_dir = download_prefix(request.data_uri, Path(tmp) / "data")
        if me != 0:
            _train_replica(request, data_dir, Path(tmp) / "work")
            return None
        out = Path(tmp) / "model"
        result = steps.train_ensemble(
            request.train_config,
            data_dir,
            out,
            tracking_uri=request.tracking_uri,
            experiment=request.experiment,
            pipeline_run_id=request.pipeline_run_id,
            checkpoint_uri=request.checkpoint_uri,
            tags=request.tags,
        )
        prefix = request.output_uri.rstrip("/")
        upload_folder(out, f"{prefix}/{MODEL_PREFIX}")
        # Last: its presence says the model folder is whole.
        put_json(f"{prefix}/{RESULT_FILE}", result.model_dump(mode="json"))
        LOG.info("rank 0: uploaded the model folder and %s to %s", RESULT_FILE, prefix)
        return result


def _train_replica(request: TrainRequest, data_dir: Path, workdir: Path) -> None:
    """A rank other than 0: the same training call, no tracking, no outputs.

    The engine (under torchrun) has rank 0 read the checkpoint rank 0 restored from S3 and broadcast it,
    syncs gradients, and writes only from rank 0: this rank's workdir stays empty.
    """
    config = steps.train_config(request.train_config, mode="ensemble")
    dataset = steps.load_prepared(data_dir, config)
    workdir.mkdir(parents=True, exist_ok=True)
    train(config, workdir, [], dataset=dataset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bockd.pipeline.trainjob_worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--request", required=True, help="s3:// URI of the JSON train request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{env_rank()} %(name)s %(message)s")
    run_worker(TrainRequest.from_dict(get_json(args.request)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
