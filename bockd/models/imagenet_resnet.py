"""ImageNet-style ResNets (torchvision blocks): stem + layer1 shared, layer2..layer4 per student."""

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from bockd.models.blueprint import Blueprint, Branch
from bockd.models.registry import register_model
from bockd.models.resnet_branch import ResidualBlock, ResNetBranch, make_stage
from bockd.models.widths import scaled_width

STEM_CHANNELS = 64
BRANCH_PLANES = (128, 256, 512)  # layer2..layer4 at full width, before block.expansion
BRANCH_STRIDES = (2, 2, 2)


def imagenet_resnet(
    block: ResidualBlock, layers: list[int], *, num_classes: int, in_channels: int, num_students: int
) -> Blueprint:
    """Base = conv7x7/2 -> BN -> ReLU -> maxpool -> layer1 (full width); branch i = scaled layer2..4."""

    def make_base() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            make_stage(block, STEM_CHANNELS, STEM_CHANNELS, layers[0], stride=1),
        )

    def make_branch(index: int) -> Branch:
        return ResNetBranch(
            block,
            inplanes=STEM_CHANNELS * block.expansion,
            planes=[scaled_width(p, index, num_students) for p in BRANCH_PLANES],
            blocks_per_stage=layers[1:],
            strides=list(BRANCH_STRIDES),
            num_classes=num_classes,
        )

    return Blueprint(make_base, make_branch, max_students=min(BRANCH_PLANES))


@register_model("resnet18")
def resnet18(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return imagenet_resnet(
        BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, num_students=num_students
    )


@register_model("resnet34")
def resnet34(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return imagenet_resnet(
        BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, num_students=num_students
    )


@register_model("resnet50")
def resnet50(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return imagenet_resnet(
        Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, num_students=num_students
    )
