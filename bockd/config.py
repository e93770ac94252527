"""Typed, validated training configuration and the named presets.

Configs are data: presets are plain dicts, YAML is read with ``safe_load``, and every value is checked
here, before any data is read or any tensor allocated. Unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bockd.errors import ConfigError

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "digits", "imagefolder")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Strict):
    arch: str = "resnet20"
    num_students: int = Field(5, ge=2, le=64)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from bockd.models import list_models  # late import: the registry imports torch models

        if arch not in list_models():
            raise ValueError(f"unknown architecture {arch!r}; expected one of: {', '.join(list_models())}")
        return arch


class DataConfig(_Strict):
    dataset: Literal["cifar10", "cifar100", "fashion-mnist", "digits", "imagefolder"] = "digits"
    path: str | None = None
    download: bool = False
    image_size: int | None = Field(None, ge=8, le=1024)
    val_fraction: float = Field(0.0, ge=0.0, lt=0.5)
    # Seeds the train/test split of datasets without an official one (digits, flat image folders) and
    # the validation split. Separate from the training seed so every seed is scored on the same test set.
    split_seed: int = Field(0, ge=0, lt=2**31)
    # A seeded, class-balanced subset of the training split (drawn with split_seed, before the validation
    # split): shorter experiments on a real dataset with its full test set. None trains on all of it.
    train_subset: int | None = Field(None, ge=1)
    augment: bool = True
    flip: bool = True


class OptimConfig(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    # "step": lr x gamma at each milestone (the paper). "cosine": lr x (1 + cos(pi * epoch / epochs)) / 2,
    # per epoch, down to ~0 at the end (Loshchilov & Hutter, SGDR, 2017); takes no milestones.
    schedule: Literal["step", "cosine"] = "step"
    lr: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0, lt=1.0)
    # Fractions of training in (0, 1), or epoch numbers >= 1: fractions keep a preset's shape when
    # --epochs shortens the run.
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = Field(0.1, gt=0.0, le=1.0)

    @field_validator("milestones")
    @classmethod
    def _sorted_milestones(cls, milestones: tuple[float, ...]) -> tuple[float, ...]:
        if any(m <= 0 for m in milestones):
            raise ValueError(f"milestones must be > 0, got {list(milestones)}")
        if list(milestones) != sorted(set(milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}")
        if milestones and any(m < 1 for m in milestones) and any(m >= 1 for m in milestones):
            raise ValueError(
                f"milestones must be all fractions in (0, 1) or all epoch numbers, got {list(milestones)}"
            )
        return milestones

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov SGD needs momentum > 0")
        if self.schedule == "cosine" and self.milestones:
            raise ValueError(
                f"milestones: a cosine schedule takes no milestones, got {list(self.milestones)} "
                "(set optim.milestones=[])"
            )
        return self


class LossConfig(_Strict):
    ce_weight: float = Field(0.7, ge=0.0)
    hint_weight: float = Field(0.15, ge=0.0)
    kd_weight: float = Field(0.15, ge=0.0)
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    kd_t_squared: bool = True
    # Who teaches student i by KD: "mean" = the mean of all N students' logits (the paper);
    # "leave-one-out" = the mean of the other N - 1 students' logits (student i is not its own teacher);
    # "wider" = the mean of the students wider than student i (S1 has none: no KD term).
    teacher: Literal["mean", "leave-one-out", "wider"] = "mean"
    # Ramp the hint and KD weights up from ~0 over the first part of training with the sigmoid-shaped
    # exp(-5 (1 - t)^2) (Laine & Aila 2017; ONE, Lan et al. 2018, ramps its KL cost over 80 of 300 epochs),
    # so the students are not pulled towards an untrained teacher. A fraction of training in (0, 1) or a
    # number of epochs >= 1, like optim.milestones; 0 = full weight from the first step (the paper).
    rampup: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _some_weight(self) -> LossConfig:
        if self.ce_weight + self.hint_weight + self.kd_weight == 0:
            raise ValueError("ce_weight, hint_weight, kd_weight: at least one must be > 0")
        return self


class RuntimeConfig(_Strict):
    device: str = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    # torch.compile's mode (with compile=true): "reduce-overhead" replays CUDA graphs (one process only),
    # "max-autotune-no-cudagraphs" autotunes kernels without them. Full training batches are compiled
    # for one static shape; a smaller last batch runs eagerly (same math, no recompile).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # Capture forward, loss and backward of a full training batch in one CUDA graph and replay it every
    # step: a CIFAR ensemble step is thousands of small kernels whose launches, not their arithmetic, set
    # the pace on a GPU. CUDA and one process only; the optimizer step stays outside the graph.
    cuda_graph: bool = False
    # DDP: average BatchNorm statistics over every rank's slice (torch.nn.SyncBatchNorm, CUDA only).
    # "auto": on when a rank's slice of the global batch is below 32 images, where per-slice statistics
    # get noisy; "on" / "off" force it. Ignored in one process.
    sync_batchnorm: Literal["auto", "on", "off"] = "auto"
    num_workers: int = Field(0, ge=0, le=64)
    checkpoint_every: int = Field(1, ge=1)
    # Evaluate on the held-out splits every k epochs and always after the last one: on a CPU the test
    # pass of a long experiment costs a third of a training epoch. Best-epoch figures then come from the
    # evaluated epochs only.
    eval_every: int = Field(1, ge=1)
    progress: Literal["auto", "bar", "log", "off"] = "auto"

    @field_validator("device")
    @classmethod
    def _device_form(cls, device: str) -> str:
        ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
        if not ok:
            raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        return device

    @model_validator(mode="after")
    def _compile_options_agree(self) -> RuntimeConfig:
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode: {self.compile_mode!r} needs runtime.compile=true")
        if self.cuda_graph and self.compile_mode == "reduce-overhead":
            raise ValueError(
                "cuda_graph: reduce-overhead already replays CUDA graphs; use one of the two "
                "(cuda_graph=true works with compile_mode default or max-autotune-no-cudagraphs)"
            )
        if self.cuda_graph and self.device == "cpu":
            raise ValueError("cuda_graph: CUDA graphs need a CUDA device, not runtime.device='cpu'")
        return self


class TrainConfig(_Strict):
    preset: str | None = None
    mode: Literal["ensemble", "baseline"] = "ensemble"
    student: int = Field(0, ge=0, description="baseline mode: 0-based student index (0 = S1)")
    epochs: int = Field(15, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    seed: int = Field(0, ge=0, lt=2**31)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        if self.student >= self.model.num_students:
            raise ValueError(
                f"student: index {self.student} is out of range for {self.model.num_students} students "
                f"(expected 0..{self.model.num_students - 1})"
            )
        late = [m for m in self.optim.milestones if m >= 1 and m > self.epochs]
        if late:
            raise ValueError(f"optim.milestones: epochs {late} lie beyond the last epoch ({self.epochs})")
        if self.loss.rampup >= 1 and self.loss.rampup > self.epochs:
            raise ValueError(
                f"loss.rampup: {self.loss.rampup:g} epochs lie beyond the last epoch ({self.epochs})"
            )
        return self

    def milestone_epochs(self) -> list[int]:
        """Milestones as epoch numbers: the lr is multiplied by gamma when this many epochs are done."""
        return [round(m * self.epochs) if m < 1 else int(m) for m in self.optim.milestones]

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during 0-based ``epoch``."""
        if self.optim.schedule == "cosine":
            return self.optim.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        passed = sum(epoch >= m for m in self.milestone_epochs())
        return self.optim.lr * self.optim.gamma**passed

    def rampup_epochs(self) -> float:
        """The length of the distillation ramp-up in epochs (0 = none)."""
        r = self.loss.rampup
        return r * self.epochs if r < 1 else r

    def distill_scale(self, progress: float) -> float:
        """Factor on the hint and KD weights after ``progress`` epochs of training (fractional: 2.5 is
        halfway through the third epoch): exp(-5 (1 - t)^2) with t = progress / ramp-up length, 1 after it."""
        length = self.rampup_epochs()
        if length <= 0 or progress >= length:
            return 1.0
        t = max(progress, 0.0) / length
        return math.exp(-5.0 * (1.0 - t) ** 2)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def training_identity(self) -> dict[str, Any]:
        """The part of the config that decides the weights: a resume must match it exactly."""
        ident = self.to_dict()
        ident.pop("runtime")
        ident.pop("preset")
        if self.mode == "baseline":
            ident.pop("loss")  # a baseline trains on cross-entropy alone: the loss settings change nothing
        return ident


_SGD_PAPER = {
    "name": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "milestones": [0.5, 0.75],
    "gamma": 0.1,
}

# bockd's measured recipe (docs/reproduction.md, "Stage A"): every student keeps cross-entropy at full
# weight; student i learns by KD from the mean of the students wider than it (S1 from the labels alone) at
# T = 3 with weight 1, ramped in over the first 27 % of training (ONE, Lan et al. 2018); no hint term; a
# cosine learning rate. Everything else is the paper's SGD recipe.
_BOCKD_LOSS = {
    "ce_weight": 1.0,
    "hint_weight": 0.0,
    "kd_weight": 1.0,
    "temperature": 3.0,
    "rampup": 0.27,
    "teacher": "wider",
}
_SGD_COSINE = {**_SGD_PAPER, "schedule": "cosine", "milestones": []}

# Presets are data. The paper omits weight decay; 5e-4 is the usual CIFAR value (see docs/reproduction.md).
# paper-* follow the paper to the letter; bockd-* are the same runs with bockd's recipe.
PRESETS: dict[str, dict[str, Any]] = {
    "paper-cifar100": {
        "epochs": 450,
        "batch_size": 128,
        "data": {"dataset": "cifar100"},
        "optim": _SGD_PAPER,
    },
    "paper-cifar10": {"epochs": 350, "batch_size": 128, "data": {"dataset": "cifar10"}, "optim": _SGD_PAPER},
    # The authors' released configs: Adam, lr 1e-3, wd 1e-5, x0.1 at epochs 200 and 300 of 350.
    "reference-adam": {
        "epochs": 350,
        "batch_size": 128,
        "data": {"dataset": "cifar10"},
        "optim": {
            "name": "adam",
            "lr": 1e-3,
            "weight_decay": 1e-5,
            "nesterov": False,
            "milestones": [200 / 350, 300 / 350],
            "gamma": 0.1,
        },
    },
    "bockd-cifar100": {
        "epochs": 450,
        "batch_size": 128,
        "data": {"dataset": "cifar100"},
        "optim": _SGD_COSINE,
        "loss": _BOCKD_LOSS,
    },
    "bockd-cifar10": {
        "epochs": 350,
        "batch_size": 128,
        "data": {"dataset": "cifar10"},
        "optim": _SGD_COSINE,
        "loss": _BOCKD_LOSS,
    },
    # About a minute on 2 CPU cores (ensemble + 5 baselines of ResNet-20): sklearn digits, offline. The
    # quick start's default, with bockd's recipe; smoke-paper is the same run with the paper's.
    "smoke": {
        "epochs": 30,
        "batch_size": 64,
        "data": {"dataset": "digits"},
        "optim": _SGD_COSINE,
        "loss": _BOCKD_LOSS,
    },
    "smoke-paper": {
        "epochs": 30,
        "batch_size": 64,
        "data": {"dataset": "digits"},
        "optim": _SGD_PAPER,
    },
}


def merge_overrides(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``override`` merged in (nested dicts merged, other values replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def format_validation_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = (
            f" (got {e['input']!r})"
            if e["type"] != "extra_forbidden" and not isinstance(e["input"], dict)
            else ""
        )
        lines.append(f"{field}: {msg}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated config: the named preset, then ``overrides`` (nested dicts) on top."""
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", None) or preset
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; expected one of: {', '.join(PRESETS)}")
    raw = merge_overrides(PRESETS[preset], overrides) if preset else overrides
    if preset:
        raw["preset"] = preset
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_errors(err)) from None


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.05", "model.arch=resnet32"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. optim.lr=0.05), got {pair!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: {key!r} conflicts with an earlier assignment")
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (``preset:`` plus overrides), with ``overrides`` applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level, got {type(raw).__name__}")
    return build_config(None, merge_overrides(raw, overrides or {}))
