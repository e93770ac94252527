"""``bockd quantize`` and ``bockd cascade`` on a real (three-epoch) digits family: exit codes, what they
print, the folders they write, and the data check that keeps the cascade's thresholds off the training
images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bockd.cli import _resolve_model, main
from bockd.errors import BockdError

TRAIN_DATA = ["--val-fraction", "0.2", "--split-seed", "0"]  # the data settings val_split_family trained on


@pytest.fixture(scope="module")
def family(val_split_family: Path) -> Path:
    """S1..S3 of a 3-epoch digits ensemble trained with 20 % of its training split held out."""
    return val_split_family / "model" / "students"


def test_quantize_writes_a_checked_int8_student(family: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    out = tmp_path / "s3-int8"
    rc = main(["quantize", str(family / "s3"), "--out", str(out), "--max-drop", "100", *TRAIN_DATA])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("S3: fp32 ") and "passed" in printed and str(out) in printed
    assert json.loads((out / "config.json").read_text())["precision"] == "int8"
    assert (out / "model.onnx").is_file() and (out / "quantization.json").is_file()


def test_quantize_refuses_a_negative_drop_limit_before_any_work(family: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q"
    assert main(["quantize", str(family / "s3"), "--out", str(out), "--max-drop", "-1"]) == 2
    assert "max_drop" in capsys.readouterr().err
    assert not out.exists()


def test_cascade_fits_on_the_held_out_split_and_reports_the_test_set(
    family: Path, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    out = tmp_path / "cascade"
    students = [str(family / f"s{k}") for k in (3, 2, 1)]
    assert main(["cascade", *students, "--out", str(out), "--costs", "1", "2", "4", *TRAIN_DATA]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("thresholds ") and "test: cascade " in printed
    card = json.loads((out / "cascade.json").read_text())
    assert [s["label"] for s in card["students"]] == ["S3", "S2", "S1"]
    assert len(card["thresholds"]) == 2
    # `bockd serve --model` takes the cascade folder as it takes a student's
    assert _resolve_model(str(out), tmp_path) == out
    with pytest.raises(BockdError, match=r"cascade\.json"):
        _resolve_model(str(tmp_path), tmp_path)


def test_cascade_refuses_data_other_than_the_training_runs(family: Path, tmp_path: Path, capsys) -> None:
    # Without --val-fraction the split the students held out cannot be rebuilt: no thresholds fitted on
    # images the students were trained on.
    out = tmp_path / "cascade"
    students = [str(family / f"s{k}") for k in (3, 1)]
    assert main(["cascade", *students, "--out", str(out), "--split-seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bockd: error: data:") and "--val-fraction" in err
    assert not out.exists()
