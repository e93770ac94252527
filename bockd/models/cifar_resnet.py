"""CIFAR ResNets (He et al. 2016, depth 6n + 2) split into a stem base and full-stage branches."""

from torch import nn
from torchvision.models.resnet import BasicBlock

from bockd.errors import ConfigError
from bockd.models.blueprint import Blueprint, Branch
from bockd.models.registry import register_model
from bockd.models.resnet_branch import ResNetBranch
from bockd.models.widths import scaled_width

STEM_CHANNELS = 16
STAGE_CHANNELS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)


def cifar_resnet(depth: int, *, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    """Base = conv3x3 -> BN -> ReLU (the stem); branch i = three stages at scaled width + pool + fc."""
    if (depth - 2) % 6 != 0:
        raise ConfigError(f"depth: a CIFAR ResNet needs depth = 6n + 2, got {depth}")
    blocks = (depth - 2) // 6

    def make_base() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(inplace=True),
        )

    def make_branch(index: int) -> Branch:
        return ResNetBranch(
            BasicBlock,
            inplanes=STEM_CHANNELS,
            planes=[scaled_width(c, index, num_students) for c in STAGE_CHANNELS],
            blocks_per_stage=[blocks] * len(STAGE_CHANNELS),
            strides=list(STAGE_STRIDES),
            num_classes=num_classes,
        )

    return Blueprint(make_base, make_branch, max_students=min(STAGE_CHANNELS))


@register_model("resnet20")
def resnet20(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return cifar_resnet(20, num_classes=num_classes, in_channels=in_channels, num_students=num_students)


@register_model("resnet32")
def resnet32(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return cifar_resnet(32, num_classes=num_classes, in_channels=in_channels, num_students=num_students)


@register_model("resnet44")
def resnet44(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return cifar_resnet(44, num_classes=num_classes, in_channels=in_channels, num_students=num_students)


@register_model("resnet56")
def resnet56(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return cifar_resnet(56, num_classes=num_classes, in_channels=in_channels, num_students=num_students)


@register_model("resnet110")
def resnet110(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return cifar_resnet(110, num_classes=num_classes, in_channels=in_channels, num_students=num_students)
