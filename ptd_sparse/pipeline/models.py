"""Models of the paper, each built from an explicit width plan (that is how students are made).

Every convolution is a MaskedConv2d and every classifier a MaskedLinear, so pruning only edits masks and retraining
runs the package's masked sparse convolution. A plan lists the output width of every layer in order:
- VGG: conv widths with "M" for a 2x2 max-pool, e.g. CIFAR VGG11 [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512];
- ResNet18: the widths of its stages, [64, 128, 256, 512] (per stage so the residual additions keep equal widths);
- MobileNetV2: the widths of its stem, its 17 inverted-residual blocks and its last 1x1 convolution.
A designed student whose widths a plan list cannot express (MobileNetV2's, a user's model) has a width map instead
(ptd_sparse.pipeline.design), applied by rewriting a copy's widths. A user's own model comes from its factory,
"package.module:function" (ptd_sparse.pipeline.factories).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ptd_sparse.nn import MaskedConv2d, MaskedLinear
from ptd_sparse.pipeline import factories
from ptd_sparse.pipeline.rewrite_widths import rewrite_widths

POOL = "M"

VGG_PLANS = {
    "vgg11": [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512],
    "vgg19": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL, 512, 512, 512, 512],
    # The fast default for Fashion-MNIST (28 x 28, one channel): small enough to train in minutes on 2 cores.
    "vgg_fmnist": [32, POOL, 64, POOL, 128, POOL],
}
RESNET18_STAGES = [64, 128, 256, 512]
# (expansion, output width, repeats, stride) of MobileNetV2's blocks, CIFAR variant (stride 1 in the first stages).
MOBILENETV2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1)]
MOBILENETV2_PLAN = [32] + [w for _, w, n, _ in MOBILENETV2_BLOCKS for _ in range(n)] + [1280]


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True):
    layers = [MaskedConv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class VGG(nn.Module):
    """CIFAR-style VGG: conv3x3-BN-ReLU blocks and max-pools from the plan, then one linear classifier."""

    def __init__(self, plan: Sequence, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        layers, width, size = [], in_channels, image_size
        for item in plan:
            if item == POOL:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += conv_bn_relu(width, int(item))
                width = int(item)
        if size < 1:
            raise ValueError(f"plan {list(plan)} pools a {image_size}-pixel image down to nothing")
        self.plan = list(plan)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = MaskedLinear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn_relu(c_in, c_out, 3, stride), *conv_bn_relu(c_out, c_out, 3, relu=False))
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(*conv_bn_relu(c_in, c_out, 1, stride, relu=False))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet18: a 3x3 stem of the first stage's width, four stages of two basic blocks, one linear layer."""

    def __init__(self, plan: Sequence[int] = RESNET18_STAGES, in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32):
        super().__init__()
        if len(plan) != 4:
            raise ValueError(f"a ResNet18 plan gives the 4 stage widths, got {list(plan)}")
        self.plan = [int(w) for w in plan]
        layers, width = list(conv_bn_relu(in_channels, self.plan[0])), self.plan[0]
        for stage, stage_width in enumerate(self.plan):
            for block in range(2):
                layers.append(BasicBlock(width, stage_width, 2 if stage > 0 and block == 0 else 1))
                width = stage_width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = MaskedLinear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int):
        super().__init__()
        hidden = c_in * expansion
        layers = [] if expansion == 1 else conv_bn_relu(c_in, hidden, 1)
        layers += conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        layers += conv_bn_relu(hidden, c_out, 1, relu=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (stride-1 stem). Depthwise convolutions keep their width tied to their block's input."""

    def __init__(self, plan: Sequence[int] = MOBILENETV2_PLAN, in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32):
        super().__init__()
        if len(plan) != len(MOBILENETV2_PLAN):
            raise ValueError(f"a MobileNetV2 plan has {len(MOBILENETV2_PLAN)} widths, got {len(plan)}")
        self.plan = [int(w) for w in plan]
        layers, width, index = list(conv_bn_relu(in_channels, self.plan[0])), self.plan[0], 1
        for expansion, _, repeats, stride in MOBILENETV2_BLOCKS:
            for repeat in range(repeats):
                layers.append(InvertedResidual(width, self.plan[index], expansion, stride if repeat == 0 else 1))
                width, index = self.plan[index], index + 1
        layers += conv_bn_relu(width, self.plan[-1], 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = MaskedLinear(self.plan[-1], num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


ARCHITECTURES = {"vgg": VGG, "resnet18": ResNet18, "mobilenetv2": MobileNetV2}


def default_plan(name: str) -> list | None:
    """The teacher plan of a model name: vgg11/16/19, vgg_fmnist, resnet18, mobilenetv2; None for a user's factory
    (package.module:function), whose own widths are its plan."""
    if factories.is_factory(name):
        return None
    if name in VGG_PLANS:
        return list(VGG_PLANS[name])
    if name == "resnet18":
        return list(RESNET18_STAGES)
    if name == "mobilenetv2":
        return list(MOBILENETV2_PLAN)
    raise ValueError(f"model must be one of {sorted(VGG_PLANS) + ['resnet18', 'mobilenetv2']}, got {name!r}")


def architecture_of(name: str) -> str:
    return "vgg" if name in VGG_PLANS or name == "vgg" else name


def build_model(name: str, plan: Sequence | dict | None = None, in_channels: int = 3, num_classes: int = 10,
                image_size: int = 32, kwargs: dict | None = None) -> nn.Module:
    """Model `name` with `plan` (default: the teacher plan of that name).

    name: a zoo name, or a user's factory "package.module:function" called with `kwargs` (ptd_sparse.pipeline.
    factories; its convolutions and linear layers become masked ones). plan: a zoo plan list, or a width map (a dict
    made by design_student for models the zoo's plans cannot express), applied to the default model by rewriting a
    copy's widths."""
    if factories.is_factory(name):
        model = factories.call_factory(name, kwargs)
    else:
        if kwargs:
            raise ValueError(f"keyword arguments are for factories (package.module:function); {name} takes none")
        base = default_plan(name) if plan is None or isinstance(plan, dict) else list(plan)
        model = ARCHITECTURES[architecture_of(name)](base, in_channels, num_classes, image_size)
    if isinstance(plan, dict):
        model = rewrite_widths(model, plan)
    elif plan is not None and factories.is_factory(name):
        raise ValueError(f"the plan of factory model {name} must be a width map (dict) or None, got {plan!r}")
    return factories.masked(model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MaskedConv2d and MaskedLinear, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]
