"""DenseNet-BC (Huang et al. 2017) for CIFAR: the first conv is shared, only the growth rate is scaled."""

import torch
from torch import Tensor, nn

from bockd.errors import ConfigError
from bockd.models.blueprint import Blueprint, Branch
from bockd.models.registry import register_model
from bockd.models.widths import scaled_width

BOTTLENECK_FACTOR = 4  # the 1x1 bottleneck conv widens to 4k channels


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (-> 4k) then BN-ReLU-conv3x3 (-> k); the k new maps are appended to the input."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        width = BOTTLENECK_FACTOR * growth_rate
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),  # in place on BN's fresh output, never on the concatenated input
            nn.Conv2d(in_channels, width, kernel_size=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, growth_rate, kernel_size=3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


def transition(in_channels: int, out_channels: int) -> nn.Sequential:
    """BN-ReLU-conv1x1 (compression) then 2x2 average pooling."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        nn.AvgPool2d(kernel_size=2, stride=2),
    )


class DenseNetBranch(Branch):
    """Three dense blocks with two transitions, final BN-ReLU, pool, fc.

    Stage outputs (the hint features): transition 1, transition 2, and the final BN-ReLU.
    """

    def __init__(
        self, *, in_channels: int, growth_rate: int, layers_per_block: int, reduction: float, num_classes: int
    ) -> None:
        super().__init__()
        channels = in_channels
        blocks, transitions, stage_channels = [], [], []
        for block_index in range(3):
            blocks.append(
                nn.Sequential(
                    *[DenseLayer(channels + j * growth_rate, growth_rate) for j in range(layers_per_block)]
                )
            )
            channels += layers_per_block * growth_rate
            if block_index < 2:
                compressed = int(channels * reduction)  # floor, as in the reference implementation
                transitions.append(transition(channels, compressed))
                channels = compressed
            stage_channels.append(channels)
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.stage_channels = stage_channels

    def forward(self, h: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = []
        for block, trans in zip(self.blocks[:-1], self.transitions, strict=True):
            h = trans(block(h))
            features.append(h)
        h = self.final(self.blocks[-1](h))
        features.append(h)
        return self.fc(torch.flatten(self.pool(h), 1)), features


def densenet_bc(
    depth: int, growth_rate: int, *, num_classes: int, in_channels: int, num_students: int
) -> Blueprint:
    """Base = the first 3x3 conv to 2k channels (never scaled); branch i grows by k_i = floor(k (N-i)/N)."""
    if (depth - 4) % 6 != 0:
        raise ConfigError(f"depth: DenseNet-BC needs depth = 6n + 4, got {depth}")
    layers_per_block = (depth - 4) // 6  # each bottleneck layer holds two convs
    base_channels = 2 * growth_rate

    def make_base() -> nn.Module:
        return nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1, bias=False)

    def make_branch(index: int) -> Branch:
        return DenseNetBranch(
            in_channels=base_channels,
            growth_rate=scaled_width(growth_rate, index, num_students),
            layers_per_block=layers_per_block,
            reduction=0.5,
            num_classes=num_classes,
        )

    return Blueprint(make_base, make_branch, max_students=growth_rate)


@register_model("densenet_bc_100_12")
def densenet_bc_100_12(*, num_classes: int, in_channels: int, num_students: int) -> Blueprint:
    return densenet_bc(100, 12, num_classes=num_classes, in_channels=in_channels, num_students=num_students)
