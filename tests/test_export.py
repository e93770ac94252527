"""Exported students: folder contents, config.json, exact reload, ONNX Runtime parity, errors, replacement.

Uses the session's tiny runs from conftest.py: a 3-student resnet20 ensemble and the baseline of S2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from numerics import assert_close_at_scale, reduction_length
from safetensors.torch import load_file

from bockd.data import ImageDataset
from bockd.errors import CheckpointError
from bockd.export import export_student, load_student, student_from_run
from bockd.models import build_student, create_model, student_table

EXPORT_FILES = {"model.safetensors", "config.json", "model.onnx"}

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def exported(single_thread, ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """S3 of the ensemble run."""
    return export_student(ensemble_run, tmp_path_factory.mktemp("export") / "s3", 2)


@pytest.fixture(scope="module")
def exported_baseline(single_thread, baseline_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The baseline run's one student (S2), exported without naming it."""
    return export_student(baseline_run, tmp_path_factory.mktemp("export") / "baseline", None)


@pytest.fixture(params=["ensemble", "baseline"])
def export_case(request: pytest.FixtureRequest) -> tuple[Path, int, str]:
    """(exported folder, 0-based student index, how it was trained)."""
    if request.param == "ensemble":
        return request.getfixturevalue("exported"), 2, "ensemble"
    return request.getfixturevalue("exported_baseline"), 1, "baseline"


def _normalize(images: np.ndarray, config: dict) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] with the export's own mean/std: what a server would do."""
    mean = np.asarray(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


# -- the folder ---------------------------------------------------------------------------------------------


def test_export_folder_holds_exactly_weights_config_and_onnx(export_case) -> None:
    folder, _, _ = export_case
    assert {p.name for p in folder.iterdir()} == EXPORT_FILES
    assert all((folder / name).stat().st_size > 0 for name in EXPORT_FILES)


def test_onnx_names_no_build_machine(export_case) -> None:
    # torch's exporter stores per-node stack traces with absolute paths; the artifact is served and shared.
    folder, _, _ = export_case
    data = (folder / "model.onnx").read_bytes()
    for leak in (b"stack_trace", b"site-packages", str(Path(__file__).resolve().parents[1]).encode()):
        assert leak not in data, leak


def test_weights_are_safetensors_never_pickle(export_case) -> None:
    folder, _, _ = export_case
    everything = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in everything if p.suffix in {".pt", ".pth", ".pkl", ".pickle", ".bin"}]
    state = load_file(str(folder / "model.safetensors"))
    assert state and all(isinstance(t, torch.Tensor) for t in state.values())
    # Exactly the student's tensors: no ensemble leftovers (other branches, hint adapters).
    assert set(state) == set(load_student(folder).state_dict())
    assert not [k for k in state if k.startswith(("adapters", "branches"))]


def test_config_json_describes_the_student(export_case, digits: ImageDataset) -> None:
    folder, k, trained_as = export_case
    config = _config(folder)
    row = student_table("resnet20", num_classes=10, in_channels=1, num_students=3)[k]
    assert config["format"] == "bockd-student/1"
    assert config["arch"] == "resnet20"
    assert config["num_students"] == 3
    assert config["index"] == k
    assert config["student"] == f"S{k + 1}" == row["student"]
    assert config["params"] == row["params"]
    assert config["size_pct"] == row["size_pct"]
    assert config["params"] == sum(p.numel() for p in load_student(folder).parameters())
    assert config["classes"] == [str(d) for d in range(10)]
    assert config["num_classes"] == 10 and config["in_channels"] == 1
    assert config["input_shape"] == [1, 8, 8]
    mean, std = digits.mean_std()
    assert config["mean"] == pytest.approx(mean, abs=1e-12)
    assert config["std"] == pytest.approx(std, abs=1e-12)
    assert 0 < config["mean"][0] < 1 and 0 < config["std"][0] < 1
    assert config["trained_as"] == trained_as


# -- the weights --------------------------------------------------------------------------------------------


def test_loaded_student_equals_the_ensemble_student_exactly(
    exported: Path, ensemble_run: Path, digits: ImageDataset
) -> None:
    x = torch.from_numpy(_normalize(digits.test.x[:16], _config(exported)))
    loaded = load_student(exported)
    assert not loaded.training
    from_run, card = student_from_run(ensemble_run, 2)
    assert not from_run.training
    ensemble = create_model(**card["ensemble"])
    ensemble.load_state_dict(load_file(str(ensemble_run / "model.safetensors")))
    ensemble.eval()
    fresh = build_student("resnet20", num_classes=10, in_channels=1, num_students=3, index=2).eval()
    with torch.no_grad():
        z = loaded(x)
        assert z.shape == (16, 10)
        assert torch.equal(z, from_run(x))
        assert torch.equal(z, ensemble(x).logits[2])
        assert not torch.equal(z, ensemble(x).logits[1])
        assert not torch.allclose(z, fresh(x))  # the trained weights were loaded, not a fresh init
        assert torch.equal(loaded(x), z)  # eval mode: batch norm uses running statistics


def test_loaded_baseline_equals_the_baseline_run(
    exported_baseline: Path, baseline_run: Path, digits: ImageDataset
) -> None:
    x = torch.from_numpy(_normalize(digits.test.x[:16], _config(exported_baseline)))
    student = build_student("resnet20", num_classes=10, in_channels=1, num_students=3, index=1)
    student.load_state_dict(load_file(str(baseline_run / "model.safetensors")))
    student.eval()
    from_run, card = student_from_run(baseline_run)
    assert card["mode"] == "baseline" and from_run.spec["index"] == 1
    with torch.no_grad():
        z = load_student(exported_baseline)(x)
        assert torch.equal(z, student(x))
        assert torch.equal(z, from_run(x))
        # Naming its own student explicitly is the same as not naming it.
        assert torch.equal(z, student_from_run(baseline_run, 1)[0](x))


@pytest.mark.parametrize("batch", [5, 1, 7])
def test_onnx_runtime_matches_pytorch_with_a_dynamic_batch(export_case, digits: ImageDataset, batch) -> None:
    folder, _, _ = export_case
    config = _config(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a shared 2-core machine: no spinning thread pool
    session = ort.InferenceSession(
        str(folder / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    (inp,) = session.get_inputs()
    assert inp.shape[1:] == config["input_shape"]
    assert not isinstance(inp.shape[0], int)  # symbolic: any batch size
    x = _normalize(digits.test.x[10 : 10 + batch], config)
    (onnx_logits,) = session.run(None, {inp.name: x})
    student = load_student(folder)
    with torch.no_grad():
        torch_logits = student(torch.from_numpy(x)).numpy()
    assert onnx_logits.shape == torch_logits.shape == (batch, 10)
    # Two runtimes, two sets of kernels (each picked by the CPU's instruction set): the same function up
    # to float32 rounding along the network, relative to the logits' magnitude.
    tol = assert_close_at_scale(onnx_logits, torch_logits, terms=reduction_length(student))
    # The predicted class agrees wherever rounding cannot swap the top two (all rows, in practice).
    top2 = np.sort(torch_logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol
    assert np.array_equal(onnx_logits.argmax(1)[clear], torch_logits.argmax(1)[clear])


# -- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [3, 9, -1, None])
def test_student_index_out_of_range_is_refused(ensemble_run: Path, tmp_path: Path, index) -> None:
    with pytest.raises(CheckpointError, match="student") as info:
        export_student(ensemble_run, tmp_path / "out", index)
    assert "S1..S3" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either
    with pytest.raises(CheckpointError, match="student"):
        student_from_run(ensemble_run, index)


@pytest.mark.parametrize("index", [0, 2])
def test_baseline_run_has_only_its_own_student(baseline_run: Path, tmp_path: Path, index) -> None:
    with pytest.raises(CheckpointError, match="S2") as info:
        export_student(baseline_run, tmp_path / "out", index)
    assert f"S{index + 1}" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"model\.json"):
        export_student(tmp_path / "missing", tmp_path / "out", 0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        export_student(tmp_path / "bad", tmp_path / "out", 0)
    assert not (tmp_path / "out").exists()


def test_corrupt_run_weights_raise_checkpoint_error(ensemble_run: Path, tmp_path: Path) -> None:
    run = _copy(ensemble_run, tmp_path)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        export_student(run, tmp_path / "out", 0)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        export_student(run, tmp_path / "out", 0)
    assert not (tmp_path / "out").exists()


def test_folder_without_config_json_is_refused(exported: Path, tmp_path: Path) -> None:
    folder = _copy(exported, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_student(folder)
    with pytest.raises(CheckpointError):
        load_student(tmp_path / "does-not-exist")


@pytest.mark.parametrize("keep", [0, 8, 100, 5000, -1])
def test_truncated_weights_raise_checkpoint_error(exported: Path, tmp_path: Path, keep: int) -> None:
    folder = _copy(exported, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_student(folder)


def test_weights_of_another_student_raise_checkpoint_error(exported: Path, tmp_path: Path) -> None:
    folder = _copy(exported, tmp_path)
    config = _config(folder)
    config["index"] = 0  # S1's shapes, S3's weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_student(folder)


@pytest.mark.parametrize(
    "text",
    [
        lambda c: json.dumps({**c, "format": "bockd-student/999"}),
        lambda c: json.dumps({k: v for k, v in c.items() if k != "format"}),
        lambda c: json.dumps([c]),
        lambda c: "{truncated",
    ],
    ids=["wrong-format", "no-format", "not-an-object", "not-json"],
)
def test_bad_config_json_raises_checkpoint_error(exported: Path, tmp_path: Path, text) -> None:
    folder = _copy(exported, tmp_path)
    (folder / "config.json").write_text(text(_config(folder)))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_student(folder)


# -- replacing an earlier export ----------------------------------------------------------------------------


def test_re_export_replaces_the_folder_whole(exported: Path, ensemble_run: Path, tmp_path: Path) -> None:
    folder = _copy(exported, tmp_path)
    (folder / "stale.txt").write_text("from an earlier export")
    (folder / "old").mkdir()
    (folder / "old" / "model.pt").write_bytes(b"\x80\x04")
    out = export_student(ensemble_run, folder, 1, onnx=False)
    assert out == folder
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json"}  # even model.onnx
    assert _config(folder)["index"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left beside it
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_student(folder)(x), student_from_run(ensemble_run, 1)[0](x))


def test_export_into_an_empty_existing_folder(ensemble_run: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    export_student(ensemble_run, tmp_path / "out", 0, onnx=False)
    assert _config(tmp_path / "out")["student"] == "S1"


@pytest.mark.parametrize("where", ["run", "parent", "other"])
def test_export_never_replaces_a_folder_that_is_not_an_export(ensemble_run: Path, tmp_path: Path, where):
    run = _copy(ensemble_run, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    out = {"run": run, "parent": tmp_path, "other": tmp_path / "other"}[where]
    with pytest.raises(CheckpointError, match="out"):
        export_student(run, out, 0, onnx=False)
    assert sorted(p.name for p in run.iterdir()) == before
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble", "other"]
