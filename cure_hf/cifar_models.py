"""The CIFAR networks of the adversarial-training literature, registered in timm's model registry.

``import cure_hf`` registers them, after which ``timm.create_model`` (and therefore transformers'
``TimmWrapperForImageClassification``) builds them by name:

- ``cifar_resnet18``: ResNet-18 with a 3x3 stride-1 stem and no max-pool (CURE, TRADES, PGD-AT);
- ``cifar_preact_resnet18``: pre-activation ResNet-18 (Rice et al., robust overfitting);
- ``cifar_wide_resnet34_10``: WideResNet-34-10 (Madry et al., TRADES).

They follow timm's model interface (``forward_features``, ``forward_head``, ``get_classifier``,
``reset_classifier``, ``pretrained_cfg`` with CIFAR-10 mean/std and 32x32 input), so they save and load
like any timm model. No pretrained weights are registered: ``pretrained=True`` only makes sense with a
``local-dir:`` or ``hf-hub:`` source that carries weights.
"""

from __future__ import annotations

from typing import List, Optional, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["CifarResNet", "CifarWideResNet", "BasicBlock", "PreActBlock", "WideBasicBlock"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    """ResNet basic block (post-activation), with a 1x1 projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU before each conv; the projection shortcut sees the activated input.

    The same block builds PreAct ResNet-18 and (widened) WideResNet-34-10."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _TimmClassifierMixin:
    """timm's classifier interface over ``self.head`` (a ``ClassifierHead``) and ``self.num_features``."""

    head: ClassifierHead

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(_TimmClassifierMixin, nn.Module):
    """ResNet for 32x32 images: 3x3 stride-1 stem, no max-pool, four stages of ``layers`` blocks."""

    def __init__(
        self,
        block: Union[str, Type[nn.Module]] = "basic",
        layers: List[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        block_cls = {"basic": BasicBlock, "preact": PreActBlock}[block] if isinstance(block, str) else block
        self.preact = block_cls is PreActBlock
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        # Post-activation nets normalise the stem; pre-activation nets normalise at the end instead.
        self.bn1 = nn.Identity() if self.preact else nn.BatchNorm2d(64)
        in_planes, stages = 64, []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(block_cls(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final_bn = nn.BatchNorm2d(in_planes) if self.preact else nn.Identity()
        self.num_features = self.head_hidden_size = in_planes
        self.head = ClassifierHead(in_planes, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if not self.preact:
            x = F.relu(self.bn1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.preact:
            x = F.relu(self.final_bn(x))
        return x


WideBasicBlock = PreActBlock  # WideResNet's block is the pre-activation block, widened by its planes


class CifarWideResNet(_TimmClassifierMixin, nn.Module):
    """WideResNet-``depth``-``widen_factor`` for 32x32 images (Zagoruyko & Komodakis), as in TRADES."""

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth={depth}: a WideResNet needs depth = 6n + 4 (e.g. 28, 34)")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        in_planes, stages = widths[0], []
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            stage = []
            for j in range(blocks):
                stage.append(WideBasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.num_features = self.head_hidden_size = in_planes
        self.head = ClassifierHead(in_planes, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(x))


def _cfg(**kwargs):
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet18": _cfg(),
        "cifar_preact_resnet18": _cfg(),
        "cifar_wide_resnet34_10": _cfg(pool_size=(8, 8)),
    }
)


def _create(variant: str, cls, pretrained: bool, **kwargs):
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18, 3x3 stride-1 stem, no max-pool: the network of CURE's and TRADES' CIFAR tables."""
    return _create(
        "cifar_resnet18", CifarResNet, pretrained, **dict(dict(block="basic", layers=[2, 2, 2, 2]), **kwargs)
    )


@register_model
def cifar_preact_resnet18(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Pre-activation ResNet-18 for 32x32 images (Rice et al., 2020)."""
    return _create(
        "cifar_preact_resnet18", CifarResNet, pretrained, **dict(dict(block="preact", layers=[2, 2, 2, 2]), **kwargs)
    )


@register_model
def cifar_wide_resnet34_10(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WideResNet-34-10 for 32x32 images (Madry et al.; Zhang et al., TRADES)."""
    return _create(
        "cifar_wide_resnet34_10", CifarWideResNet, pretrained, **dict(dict(depth=34, widen_factor=10), **kwargs)
    )
