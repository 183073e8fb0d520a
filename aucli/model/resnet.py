"""The ResNet backbones, written out: the torchvision/timm architecture (ResNet v1.5:
the stride on the 3x3 convolution), with timm's module names and initialisation.

aucli builds its ResNets here rather than through timm so that ``aucli detect``
starts without importing timm, which imports torchvision and with it
``torch._dynamo``: importing them took about 4 s on top of torch's 2.7 s on the
2-core development machine (measured while it was busy). State-dict keys are timm's (and
torchvision's) ``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``downsample.0``, so
timm's ImageNet weights and reference checkpoints load unchanged. Built with the
same random seed, the weights equal timm's to the bit (tests/test_backbone.py).
"""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class Bottleneck(nn.Module):
    """1x1, 3x3 (with the stride), 1x1 convolutions, 4x wider out (ResNet-50 and up)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class ResNet(nn.Module):
    """Stem (7x7 stride-2 convolution, max pooling) and four stages; no classifier.

    ``feature_info`` lists the channels of the stem and of each stage, as timm's does.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        channels: tuple[int, ...] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        inplanes = 64
        self.conv1 = nn.Conv2d(3, inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info = [{"num_chs": inplanes, "module": "act1"}]
        for stage, (planes, blocks) in enumerate(zip(channels, layers)):
            stride = 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            stage_blocks = [block(inplanes, planes, stride, downsample)]
            inplanes = planes * block.expansion
            stage_blocks += [block(inplanes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*stage_blocks))
            self.feature_info.append({"num_chs": inplanes, "module": f"layer{stage + 1}"})
        # timm's initialisation; BatchNorm keeps weight 1 and bias 0, also on the last
        # BN of each block (timm's zero_init_last=False, as torchvision and the reference).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        """(M, 3, H, W) -> the last stage's map (M, C, H/32, W/32). (Backbone taps every stage.)"""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


RESNETS = {
    "resnet18": lambda: ResNet(BasicBlock, (2, 2, 2, 2)),
    "resnet50": lambda: ResNet(Bottleneck, (3, 4, 6, 3)),
    # A small ResNet-18-like net for fast tests (timm's ResNet with these layers and channels).
    "resnet_tiny": lambda: ResNet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128)),
}
