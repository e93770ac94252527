"""ResNet stages and the branch that stacks them; shared by the CIFAR and ImageNet families."""

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from bockd.models.blueprint import Branch

ResidualBlock = type[BasicBlock] | type[Bottleneck]


def make_stage(
    block: ResidualBlock, inplanes: int, planes: int, num_blocks: int, stride: int
) -> nn.Sequential:
    """torchvision's ``_make_layer``: a projection shortcut (1x1 conv + BN) wherever the shape changes.

    This is "option B" everywhere; a narrowed branch's first block (e.g. 16 -> 12 channels at stride 1)
    therefore gets a projection too.
    """
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out_channels, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*layers)


class ResNetBranch(Branch):
    """Residual stages + global average pool + fc; reports each stage's output as a hint feature."""

    def __init__(
        self,
        block: ResidualBlock,
        *,
        inplanes: int,
        planes: list[int],
        blocks_per_stage: list[int],
        strides: list[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        stages = []
        for width, num_blocks, stride in zip(planes, blocks_per_stage, strides, strict=True):
            stages.append(make_stage(block, inplanes, width, num_blocks, stride))
            inplanes = width * block.expansion
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [width * block.expansion for width in planes]
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size >= 8x8
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, h: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = []
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        # flatten, not view: channels_last tensors are not contiguous in NCHW order.
        return self.fc(torch.flatten(self.pool(h), 1)), features
