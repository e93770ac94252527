"""The ``bockd`` command line: models, train, export, quantize, cascade, reproduce, study, services, pipeline,
serve, predict."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from bockd import __version__
from bockd.config import DATASETS, PRESETS, build_config, load_config, parse_assignments
from bockd.errors import BockdError


def _cmd_models(args: argparse.Namespace) -> int:
    from bockd.models import list_models, student_table

    rows = {
        name: student_table(
            name, num_classes=args.num_classes, in_channels=args.in_channels, num_students=args.num_students
        )
        for name in list_models()
    }
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    labels = [f"S{k + 1}" for k in range(args.num_students)]
    print(f"{'architecture':<20} " + " ".join(f"{label:>20}" for label in labels))
    for name, table in rows.items():
        cells = [f"{r['params']:,} ({r['size_pct']:.2f}%)" for r in table]
        print(f"{name:<20} " + " ".join(f"{c:>20}" for c in cells))
    print(
        f"\nparams of base + branch, adapters excluded; {args.num_classes} classes, "
        f"{args.in_channels} input channel(s), {args.num_students} students"
    )
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    over = parse_assignments(args.set or [])
    if getattr(args, "epochs", None) is not None:
        over["epochs"] = args.epochs
    if getattr(args, "data_path", None) is not None:
        over.setdefault("data", {})["path"] = args.data_path
    if getattr(args, "progress", None) is not None:
        over.setdefault("runtime", {})["progress"] = args.progress
    return over


def _cmd_train(args: argparse.Namespace) -> int:
    from bockd.engine import train

    over = _overrides(args)
    if args.mode is not None:
        over["mode"] = args.mode
    if args.student is not None:
        over["student"] = args.student - 1
    if args.config:
        config = load_config(args.config, {**({"preset": args.preset} if args.preset else {}), **over})
    else:
        config = build_config(args.preset, over)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    callbacks = []
    if args.mlflow_uri:
        from bockd.platform.tracking import (
            MlflowCallback,  # mlflow is an optional dependency (the pipeline extra)
        )

        callbacks.append(
            MlflowCallback(args.mlflow_uri, experiment=args.experiment, run_name=Path(args.workdir).name)
        )
    result = train(config, args.workdir, callbacks)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for the group
        return 0
    print(json.dumps(result.summary(), indent=2))
    print(f"weights, config and history in {args.workdir}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bockd.export import export_student

    index = None if args.student is None else args.student - 1
    out = export_student(args.run, args.out, index, onnx=not args.no_onnx)
    print(out)
    return 0


def _student_data(args: argparse.Namespace, config: dict[str, Any]) -> tuple[Any, bool]:
    """The dataset the exported student (its ``config``) was trained on, loaded with the data settings in
    ``args``; and whether it is the very dataset (the sha256 the training run recorded)."""
    from bockd.engine import load_training_data

    trained_on = config.get("dataset") or {}
    data = {
        "dataset": args.dataset or trained_on.get("name"),
        "path": args.data_path,
        "image_size": args.image_size,
        "train_subset": args.train_subset,
        "val_fraction": args.val_fraction,
        "split_seed": args.split_seed,
    }
    dataset = load_training_data(
        build_config(None, {"data": {k: v for k, v in data.items() if v is not None}})
    )
    return dataset, trained_on.get("sha256") == dataset.sha256()


def _cmd_quantize(args: argparse.Namespace) -> int:
    from bockd.export_format import read_student_config
    from bockd.quantize import quantize_and_check

    dataset, same = _student_data(args, read_student_config(args.student))
    if not same:
        logging.getLogger("bockd.cli").warning(
            "these data settings do not give the dataset the student was trained on (sha256 differs): "
            "calibration images may not come from its training split"
        )
    check = quantize_and_check(
        args.student,
        args.out,
        dataset.train.x,
        dataset.test.x,
        dataset.test.y,
        max_drop=args.max_drop,
        max_images=args.calibration_images,
    )
    verdict = "passed" if check.passed else "FAILED"
    print(
        f"{check.student}: fp32 {check.fp32_top1:.2f} %, int8 {check.int8_top1:.2f} % "
        f"(drop {check.drop:+.2f} points, limit {check.max_drop:.2f}: {verdict}); "
        f"model.onnx {check.fp32_bytes:,} -> {check.int8_bytes:,} bytes; {args.out}"
    )
    return 0 if check.passed else 1


def _cmd_cascade(args: argparse.Namespace) -> int:
    import numpy as np

    from bockd.cascade import build_cascade, evaluate_cascade
    from bockd.errors import DataError
    from bockd.export_format import read_student_config
    from bockd.onnx_student import OnnxStudent, softmax

    dataset, same = _student_data(args, read_student_config(args.students[0]))
    if not same or dataset.val is None:
        raise DataError(
            "data: the thresholds need the validation split the students' training held out: pass the "
            "training run's data settings (--val-fraction > 0, --split-seed, --train-subset, --image-size) "
            "so that the dataset's sha256 equals the one in the students' config.json"
        )
    students = [OnnxStudent(folder) for folder in args.students]
    batch = dataset.val.x[: args.cost_batch]
    costs = args.costs or [s.forward_ms(batch) / len(batch) for s in students]
    fit = build_cascade(
        args.students,
        args.out,
        dataset.val.x,
        dataset.val.y,
        costs,
        target_top1=args.target_top1,
        max_drop=args.max_drop,
    )
    test = [softmax(s.logits(dataset.test.x)) for s in students]
    result = evaluate_cascade(test, dataset.test.y, fit.thresholds, costs)
    singles = ", ".join(
        f"{s.config['student']} {100.0 * float(np.mean(p.argmax(1) == dataset.test.y)):.2f} %"
        for s, p in zip(students, test, strict=True)
    )
    print(
        f"thresholds {', '.join(f'{t:.4f}' for t in fit.thresholds)} "
        f"(validation: {fit.val_top1:.2f} % for a target of {fit.target_top1:.2f} %, "
        f"{'reached' if fit.reached else 'NOT reached'})"
    )
    print(f"test: cascade {json.dumps(result)}; alone: {singles}")
    print(args.out)
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
            if not seeds:
                raise ValueError(text)
            return seeds
        count = int(text)
    except ValueError:
        raise BockdError(f"--seeds: expected a count (3) or a list (0,1,2), got {text!r}") from None
    if count < 1:
        raise BockdError(f"--seeds: expected at least 1 seed, got {count}")
    return list(range(count))


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from bockd.reproduce import markdown_table, reproduce

    summary = reproduce(
        args.dataset,
        args.arch,
        args.preset,
        args.out,
        seeds=_parse_seeds(args.seeds),
        epochs=args.epochs,
        num_students=args.num_students,
        data_path=args.data_path,
        overrides=_overrides(args),
        baselines=_baseline_choice(args),
        runs_dir=args.runs_dir,
    )
    print(markdown_table(summary, summary["title"]))
    print(
        f"results: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}, "
        f"{Path(args.out) / 'accuracy_vs_params.png'}"
    )
    return 0


def _baseline_choice(args: argparse.Namespace) -> bool | list[int]:
    """--no-baselines, --baselines 1,5 (1-based students) or every student."""
    if args.no_baselines:
        return False
    if args.baselines is None or args.baselines == "all":
        return True
    try:
        return [int(k) - 1 for k in args.baselines.split(",")]
    except ValueError:
        raise BockdError(
            f"--baselines: expected 'all' or 1-based students like 1,5, got {args.baselines!r}"
        ) from None


def _cmd_study(args: argparse.Namespace) -> int:
    from bockd.study import comparison_markdown, load_study, run_study

    spec = load_study(args.study)
    table = run_study(spec, args.out, source=args.data_path)
    print(comparison_markdown(table, table["title"]))
    out = Path(args.out)
    print(f"results: {out / 'study.md'}, {out / 'study.json'}, {out / 'study.png'}; per recipe {out}/<name>/")
    return 0


def _cmd_services(args: argparse.Namespace) -> int:
    from bockd.platform import services

    state = Path(args.state_dir)
    if args.action == "up":
        info = services.up(state, s3_port=args.s3_port, mlflow_port=args.mlflow_port, timeout=args.timeout)
        print(f"S3 (SeaweedFS): {info.s3_endpoint}  bucket: {info.bucket}")
        print(f"MLflow:         {info.mlflow_uri}")
        print(f"credentials:    {state / 'credentials.env'} (mode 0600)")
    elif args.action == "down":
        from bockd.platform.services.model_servers import stop_all_local_servers

        for name in stop_all_local_servers(state / "serving"):  # what `pipeline run --local` deployed
            print(f"stopped model server {name}")
        services.down(state)
        print(f"stopped; data kept in {state}")
    else:
        report = services.status(state)
        for s in report.services:
            state_word = "running" if s.running else "stopped"
            health = " healthy" if s.healthy else (" UNHEALTHY" if s.running else "")
            where = f"{s.endpoint or ''}  log={s.log or '-'}"
            print(f"{s.name:<8} {state_word}{health}  pid={s.pid or '-'}  {where}")
        return 0 if report.running else 3
    return 0


def _resolve_model(source: str, cache: Path) -> Path:
    """A local folder as is; ``s3://`` prefixes and ``models:/name@alias`` (MLflow) downloaded first."""
    if source.startswith("s3://"):
        from bockd.platform.s3 import download_prefix

        return download_prefix(source, cache / source.removeprefix("s3://").replace("/", "_"))
    if source.startswith("models:/"):
        from mlflow.artifacts import download_artifacts

        target = cache / source.removeprefix("models:/").replace("/", "_").replace("@", "_")
        target.mkdir(parents=True, exist_ok=True)
        return Path(download_artifacts(artifact_uri=source, dst_path=str(target)))
    folder = Path(source)
    if not any((folder / card).is_file() for card in ("config.json", "cascade.json")):
        raise BockdError(
            f"--model: {source!r} is neither an exported student folder (config.json) nor a cascade "
            "(cascade.json, bockd cascade)"
        )
    return folder


def _default_name(source: str) -> str:
    """``models:/bockd-digits-resnet20-s4@champion`` -> ``bockd-digits-resnet20-s4``; else the last part."""
    if source.startswith("models:/"):
        return re.split(r"[@/]", source.removeprefix("models:/"))[0]
    return Path(source.rstrip("/")).name


def _cmd_serve(args: argparse.Namespace) -> int:
    from bockd.serving.server import main as serve

    folders = [_resolve_model(m, Path(args.cache_dir)) for m in args.model]
    name = args.name or ("ensemble" if len(folders) > 1 else _default_name(args.model[0]))
    argv = ["--model_name", name, "--backend", args.backend, "--http_port", str(args.port)]
    argv += ["--host", args.host, "--enable_grpc", "false"]
    for folder in folders:
        argv += ["--model_dir", str(folder)]
    url = f"http://{args.host}:{args.port}"
    print(f"serving {name} on {url}: V1 {url}/v1/models/{name}:predict, V2 {url}/v2/models/{name}/infer")
    serve(argv)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from bockd.serving.client import predict_files

    answers = predict_files(args.url, args.name, args.images)
    for path, answer in zip(args.images, answers, strict=True):
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in answer["top_k"][: args.top])
        print(f"{path}: {top}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bockd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bockd {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list architectures with each student's parameter count")
    p.add_argument("--json", action="store_true")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--num-students", type=int, default=5)
    p.add_argument("--in-channels", type=int, default=3)
    p.set_defaults(func=_cmd_models)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--epochs", type=int, help="override the preset's number of epochs")
        p.add_argument(
            "--data-path", help="dataset file or folder (see docs); default: the dataset's default"
        )
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="any config value, e.g. optim.lr=0.05"
        )
        p.add_argument("--progress", choices=["auto", "bar", "log", "off"])

    p = sub.add_parser("train", help="train a BOC-KD ensemble or one baseline student")
    p.add_argument("--config", help="YAML config (preset: plus overrides)")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--mode", choices=["ensemble", "baseline"])
    p.add_argument("--student", type=int, help="baseline mode: which student, 1-based (1 = S1)")
    p.add_argument("--workdir", default="runs/train", help="checkpoints and outputs (resumes if present)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="log params and per-epoch metrics to this MLflow server (default $MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--experiment", default="bockd", help="MLflow experiment name")
    common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export one student: safetensors + config.json + ONNX")
    p.add_argument("--run", required=True, help="a finished training run folder")
    p.add_argument("--student", type=int, help="1-based student of an ensemble run (1 = S1)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--no-onnx", action="store_true")
    p.set_defaults(func=_cmd_export)

    def student_data(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", choices=DATASETS, help="default: the one in the student's config.json")
        p.add_argument("--data-path", help="dataset file or folder; default: the dataset's default")
        p.add_argument("--image-size", type=int, help="as the training run's data.image_size")
        p.add_argument("--train-subset", type=int, help="as the training run's data.train_subset")
        p.add_argument("--val-fraction", type=float, help="as the training run's data.val_fraction")
        p.add_argument("--split-seed", type=int, help="as the training run's data.split_seed")

    p = sub.add_parser(
        "quantize", help="int8 student (ONNX Runtime static quantization), checked on the test set"
    )
    p.add_argument("student", help="an exported student folder (config.json + model.onnx)")
    p.add_argument(
        "--out", required=True, help="folder to write: int8 model.onnx, config.json, quantization.json"
    )
    p.add_argument("--max-drop", type=float, default=1.0, help="largest top-1 drop allowed, in points")
    p.add_argument("--calibration-images", type=int, default=512, help="training images to calibrate on")
    student_data(p)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser(
        "cascade", help="confidence cascade of students, thresholds fitted on the validation split"
    )
    p.add_argument("students", nargs="+", help="exported student folders, smallest first (e.g. s5 s3 s1)")
    p.add_argument("--out", required=True, help="folder to write: cascade.json and the students")
    p.add_argument(
        "--max-drop", type=float, default=0.5, help="target: the largest student's top-1 minus this"
    )
    p.add_argument("--target-top1", type=float, help="target validation top-1 (%%) instead of --max-drop")
    p.add_argument("--costs", type=float, nargs="+", help="ms per image per student (default: measured here)")
    p.add_argument("--cost-batch", type=int, default=32, help="batch size of the cost measurement")
    student_data(p)
    p.set_defaults(func=_cmd_cascade)

    p = sub.add_parser("reproduce", help="ensemble + every baseline on one schedule; table and plot")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--seeds", default="1", help="a count (3 = seeds 0,1,2) or a list (0,4,7)")
    p.add_argument("--num-students", type=int, default=5)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--baselines", help="students that get a baseline run: 'all' (default) or e.g. 1,5")
    which.add_argument("--no-baselines", action="store_true")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--runs-dir", help="keep the runs here, shared with other reproductions (default: --out)")
    common(p)
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("study", help="compare training recipes, each against its own baselines (YAML study)")
    p.add_argument("study", help="study file: dataset, arch, seeds, baselines, common settings, recipes")
    p.add_argument("--out", default="runs/study", help="runs, per-recipe results and the comparison")
    p.add_argument(
        "--data-path",
        help="read the dataset from here instead of the study's data_path (not part of the runs' identity)",
    )
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("services", help="the embedded S3 (SeaweedFS) and MLflow servers on 127.0.0.1")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--state-dir", default=".bockd", help="data, logs, PIDs and credentials (default .bockd)")
    p.add_argument("--s3-port", type=int, help="default: a free port")
    p.add_argument("--mlflow-port", type=int, help="default: a free port")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for health checks")
    p.set_defaults(func=_cmd_services)

    p = sub.add_parser("serve", help="serve exported students with KServe on 127.0.0.1 (V1 + V2 REST)")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="exported student folder, s3://bucket/prefix or models:/name@alias; twice or more: an ensemble",
    )
    p.add_argument("--name", help="model name in the URL (default: the folder name, or 'ensemble')")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--backend",
        choices=["onnx", "torch"],
        default="onnx",
        help="ONNX Runtime (what the cluster serves) or PyTorch",
    )
    p.add_argument(
        "--cache-dir", default=".bockd/models", help="where s3:// and models:/ sources are downloaded"
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("predict", help="send PNG/JPEG images to a served student (V1 protocol)")
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8080")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--top", type=int, default=3, help="classes to print per image")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=_cmd_predict)

    from bockd.pipeline.cli import add_parser as add_pipeline_parser

    add_pipeline_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except BockdError as err:
        print(f"bockd: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `bockd models --json | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit flush
        return 0
    except KeyboardInterrupt:
        print(
            "bockd: interrupted; run the same command again to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
