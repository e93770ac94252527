"""Weight initialization shared by every architecture (torchvision's ResNet recipe)."""

from torch import nn


def init_weights(module: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_out, relu) convs with zero bias, BN weight 1 / bias 0; Linear keeps its default.

    Every random draw comes from torch's global generator, so ``torch.manual_seed`` makes builds repeatable.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module
