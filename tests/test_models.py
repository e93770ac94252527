"""Contract tests for the model zoo, parametrized over every registered architecture (timm style)."""

import json

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_at_scale, reduction_length
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from bockd.errors import ConfigError
from bockd.models import (
    BranchedEnsemble,
    EnsembleOutput,
    Student,
    build_student,
    create_model,
    list_models,
    student_table,
)

ALL_MODELS = list_models()
IMAGENET_MODELS = {"resnet18", "resnet34", "resnet50"}
BATCH = 2


def input_sizes(arch: str) -> tuple[int, ...]:
    """Small inputs: CIFAR nets at the minimum 8x8 and at their native 32x32, ImageNet nets at 64x64."""
    return (64,) if arch in IMAGENET_MODELS else (8, 32)


def make_input(arch: str, in_channels: int = 3, size: int | None = None) -> torch.Tensor:
    size = size or input_sizes(arch)[0]
    return torch.randn(BATCH, in_channels, size, size, generator=torch.Generator().manual_seed(1))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_list_models_is_sorted_and_holds_every_architecture() -> None:
    expected = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "densenet_bc_100_12"}
    assert expected | IMAGENET_MODELS == set(ALL_MODELS)
    assert sorted(ALL_MODELS) == ALL_MODELS


@pytest.mark.parametrize(
    ("arch", "num_students", "size"),
    [(arch, n, size) for arch in ALL_MODELS for n in (5, 2) for size in input_sizes(arch)],
)
def test_forward_shapes(arch: str, num_students: int, size: int) -> None:
    model = create_model(arch, num_students=num_students)
    with torch.no_grad():
        out = model(make_input(arch, size=size))
    assert isinstance(out, EnsembleOutput)
    assert model.num_students == num_students
    assert len(model.branches) == num_students and len(model.adapters) == num_students - 1
    assert len(out.logits) == len(out.features) == num_students
    for logits in out.logits:
        assert logits.shape == (BATCH, 10)
        assert torch.isfinite(logits).all()
    for student_features, channels in zip(out.features, model.stage_channels, strict=True):
        assert len(student_features) == 3
        assert [f.shape[1] for f in student_features] == channels
        # Every student sees the same spatial sizes at a stage: only channel counts differ.
        assert [f.shape[2:] for f in student_features] == [f.shape[2:] for f in out.features[0]]


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_grey_input_odd_classes_and_odd_student_count(arch: str) -> None:
    model = create_model(arch, num_classes=7, in_channels=1, num_students=3)
    with torch.no_grad():
        out = model(make_input(arch, in_channels=1))
    assert [tuple(logits.shape) for logits in out.logits] == [(BATCH, 7)] * 3


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_backward_gives_finite_gradients_on_every_parameter(arch: str) -> None:
    model = create_model(arch)
    out = model(make_input(arch))
    target = torch.tensor([1, 3])
    loss = sum(F.cross_entropy(logits, target) for logits in out.logits)
    for i in range(1, model.num_students):  # hint loss, so the adapters get gradients too
        adapted = model.adapt(i, out.features[i])
        loss = loss + sum(F.mse_loss(a, f.detach()) for a, f in zip(adapted, out.features[0], strict=True))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.base.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.adapters.parameters())


def test_every_student_sends_gradient_to_the_shared_base() -> None:
    model = create_model("resnet20")
    x = make_input("resnet20")
    for k in range(model.num_students):
        model.zero_grad(set_to_none=True)
        model(x).logits[k].square().sum().backward()
        assert model.base[0].weight.grad.abs().sum() > 0, f"S{k + 1}"
        others = [b for j, b in enumerate(model.branches) if j != k]
        assert all(p.grad is None for b in others for p in b.parameters())


def _warm_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """One train-mode pass so eval mode uses non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_extracted_students_equal_ensemble_logits(arch: str) -> None:
    model = create_model(arch)
    x = make_input(arch)
    _warm_batchnorm(model, x)
    with torch.no_grad():
        ensemble_logits = model(x).logits
        for k in range(model.num_students):
            student = model.extract_student(k)
            assert isinstance(student, Student)
            assert not student.training
            assert torch.equal(student(x), ensemble_logits[k]), f"S{k + 1}"
            assert student.spec == {**model.spec, "index": k}
            assert count(student) == model.student_parameter_count(k)
    assert [model.student_parameter_count(k) for k in range(model.num_students)] == [
        row["params"] for row in student_table(arch)
    ]


def test_extracted_student_is_a_copy() -> None:
    model = create_model("resnet20")
    student = model.extract_student(2)
    with torch.no_grad():
        model.base[0].weight.add_(1.0)
        model.branches[2].fc.bias.add_(1.0)
    assert not torch.equal(student.base[0].weight, model.base[0].weight)
    assert not torch.equal(student.branch.fc.bias, model.branches[2].fc.bias)


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_build_student_reloads_exported_weights(arch: str) -> None:
    model = create_model(arch, num_classes=7, in_channels=1, num_students=4)
    x = make_input(arch, in_channels=1)
    _warm_batchnorm(model, x)
    for k in (1, model.num_students - 1):
        exported = model.extract_student(k)
        # Round-trip through safetensors bytes: the state dict must be storable without pickle.
        state = load_safetensors(save_safetensors(exported.state_dict()))
        spec = json.loads(json.dumps(exported.spec))
        rebuilt = build_student(**spec)
        rebuilt.load_state_dict(state)
        rebuilt.eval()
        with torch.no_grad():
            assert torch.equal(rebuilt(x), exported(x)), f"S{k + 1}"


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_adapters_map_to_s1_channels(arch: str) -> None:
    model = create_model(arch)
    assert len(model.adapters) == model.num_students - 1
    for i in range(1, model.num_students):
        for b, adapter in enumerate(model.adapters[i - 1]):
            assert isinstance(adapter, nn.Conv2d) and adapter.kernel_size == (1, 1)
            assert adapter.bias is not None
            assert adapter.in_channels == model.stage_channels[i][b]
            assert adapter.out_channels == model.stage_channels[0][b]
    # Adapters are registered parameters, so an optimizer built from model.parameters() includes them.
    param_ids = {id(p) for p in model.parameters()}
    assert all(id(p) in param_ids for p in model.adapters.parameters())
    with torch.no_grad():
        out = model(make_input(arch))
        adapted = model.adapt(model.num_students - 1, out.features[-1])
    assert [a.shape for a in adapted] == [f.shape for f in out.features[0]]


def test_spec_is_json_and_rebuilds_the_same_shape() -> None:
    model = create_model("densenet_bc_100_12", num_classes=100, in_channels=1, num_students=3)
    spec = json.loads(json.dumps(model.spec))
    assert spec == {"arch": "densenet_bc_100_12", "num_classes": 100, "in_channels": 1, "num_students": 3}
    rebuilt = create_model(**spec)
    assert isinstance(rebuilt, BranchedEnsemble)
    assert rebuilt.stage_channels == model.stage_channels
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_stage_channel_layouts() -> None:
    cifar = [[16, 32, 64], [12, 25, 51], [9, 19, 38], [6, 12, 25], [3, 6, 12]]
    assert create_model("resnet20").stage_channels == cifar
    assert create_model("resnet18").stage_channels[4] == [25, 51, 102]
    assert create_model("resnet50").stage_channels[0] == [512, 1024, 2048]
    densenet = create_model("densenet_bc_100_12")
    # Only the growth rate is scaled (12, 9, 7, 4, 2); the shared base stays 24 channels wide.
    assert densenet.base.out_channels == 24
    assert densenet.stage_channels == [
        [108, 150, 342],
        [84, 114, 258],
        [68, 90, 202],
        [44, 54, 118],
        [28, 30, 62],
    ]


# Paper Table 1 (10 classes, N = 5) and the 100-class ResNet110 row from the design notes.
PARAM_TABLE = [
    ("resnet20", 10, [272_474, 171_536, 97_018, 42_231, 10_773], [100, 62.95, 35.61, 15.50, 3.95]),
    ("resnet32", 10, [466_906, 293_560, 165_442, 71_555, 17_745], [100, 62.87, 35.43, 15.33, 3.80]),
    ("resnet44", 10, [661_338, 415_584, 233_866, 100_879, 24_717], [100, 62.84, 35.36, 15.25, 3.74]),
    ("resnet110", 10, [1_730_714, 1_086_716, 610_198, 262_161, 63_063], [100, 62.79, 35.26, 15.15, 3.64]),
    (
        "densenet_bc_100_12",
        10,
        [769_162, 446_170, 279_482, 102_410, 33_002],
        [100, 58.01, 36.34, 13.31, 4.29],
    ),
    ("resnet110", 100, [1_736_564, 1_091_396, 613_708, 264_501, 64_233], None),
]


@pytest.mark.parametrize(("arch", "num_classes", "params", "size_pct"), PARAM_TABLE)
def test_parameter_counts_match_the_paper(
    arch: str, num_classes: int, params: list[int], size_pct: list[float] | None
) -> None:
    table = student_table(arch, num_classes=num_classes)
    assert [row["params"] for row in table] == params
    assert [row["student"] for row in table] == ["S1", "S2", "S3", "S4", "S5"]
    assert [row["index"] for row in table] == [0, 1, 2, 3, 4]
    assert [row["width_multiplier"] for row in table] == [1.0, 0.8, 0.6, 0.4, 0.2]
    if size_pct is not None:
        assert [row["size_pct"] for row in table] == size_pct


def test_creation_is_deterministic_under_manual_seed() -> None:
    torch.manual_seed(123)
    first = create_model("resnet20", num_students=3).state_dict()
    torch.manual_seed(123)
    second = create_model("resnet20", num_students=3).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_channels_last_and_bf16_autocast(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_students=2).eval()
    x = make_input(arch)
    with torch.no_grad():
        reference = model(x).logits
        model_cl = model.to(memory_format=torch.channels_last)
        channels_last = model_cl(x.to(memory_format=torch.channels_last)).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = model_cl(x.to(memory_format=torch.channels_last)).logits
    # channels_last only reorders each convolution's float32 sums (which order depends on the CPU's
    # instruction set and thread count), so the logits drift by rounding relative to the whole output's
    # magnitude (randomly initialised nets reach 1e4; an elementwise rtol fails on the small logits);
    # a layout bug would change them by O(magnitude).
    terms = reduction_length(model)
    for ref, cl, bf in zip(reference, channels_last, low_precision, strict=True):
        assert_close_at_scale(cl, ref, terms=terms)
        assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all()


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: create_model("resnet21"), "arch"),
        (lambda: create_model("resnet20", num_students=1), "num_students"),
        (lambda: create_model("resnet20", num_students=17), "num_students"),  # S17 would be 0 wide
        (lambda: create_model("densenet_bc_100_12", num_students=13), "num_students"),
        (lambda: create_model("resnet20", num_classes=1), "num_classes"),
        (lambda: create_model("resnet20", num_classes=True), "num_classes"),
        (lambda: create_model("resnet20", in_channels=0), "in_channels"),
        (lambda: student_table("resnet20", num_classes=2.5), "num_classes"),
        (lambda: build_student("nope", num_classes=10, in_channels=3, num_students=5, index=0), "arch"),
        (lambda: build_student("resnet20", num_classes=10, in_channels=3, num_students=5, index=5), "index"),
        (lambda: build_student("resnet20", num_classes=10, in_channels=3, num_students=5, index=-1), "index"),
        (lambda: create_model("resnet20", num_students=2).extract_student(2), "index"),
        (lambda: create_model("resnet20", num_students=2).student_parameter_count(-1), "index"),
        (lambda: create_model("resnet20", num_students=2).adapt(0, []), "index"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_argument(call, argument: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{argument}: "):
        call()


def test_unknown_arch_message_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"expected one of: .*resnet20"):
        create_model("resnet21")
