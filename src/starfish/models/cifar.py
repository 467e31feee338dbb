"""Built-in CIFAR-10 networks whose state-dict layouts match the shared pretrained checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from starfish.models.registry import Preprocess, register_model

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class CifarViT(nn.Module):
    """A small ViT built from stock ``nn.TransformerEncoder`` layers (post-norm, ReLU)."""

    def __init__(
        self,
        img_size: int = 32,
        patch: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 8,
        mlp_dim: int = 256,
        num_classes: int = 10,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        tokens = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.transformer(x)
        return self.mlp_head(x[:, 0])


class ShortcutA(nn.Module):
    """Parameter-free 'option A' shortcut: subsample spatially, zero-pad channels."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2, widths 16/32/64)."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


@register_model("cifar10-vit", "ViT (6 post-norm layers, width 128, patch 4) for 32x32 CIFAR-10")
def cifar10_vit(num_classes: int = 10) -> tuple[nn.Module, Preprocess]:
    return CifarViT(num_classes=num_classes), Preprocess(32, CIFAR_MEAN, CIFAR_STD)


def _imagenet_stats_cifar(depth: int, num_classes: int) -> tuple[nn.Module, Preprocess]:
    from starfish.models.registry import IMAGENET_MEAN, IMAGENET_STD

    return CifarResNet(depth, num_classes), Preprocess(32, IMAGENET_MEAN, IMAGENET_STD)


@register_model("cifar10-resnet20", "CIFAR ResNet-20 (option-A shortcuts), ImageNet normalization")
def cifar10_resnet20(num_classes: int = 10) -> tuple[nn.Module, Preprocess]:
    return _imagenet_stats_cifar(20, num_classes)


@register_model("cifar10-resnet56", "CIFAR ResNet-56 (option-A shortcuts), ImageNet normalization")
def cifar10_resnet56(num_classes: int = 10) -> tuple[nn.Module, Preprocess]:
    return _imagenet_stats_cifar(56, num_classes)
