"""TEMPORARY stand-in for ``examples/zoo.py: resnet50_shaped`` until that lands (another branch writes it).

``benchmarks/shrink.py`` uses ``examples/zoo.py`` when it exists and has ``resnet50_shaped``, and this
file otherwise; delete this file once the real one is in. The signature is the one announced for
``examples/zoo.py``. Plain ``torch`` only: the torch-pruning peer venv imports this file by path, and it
has neither prunespec nor torchvision.
"""

from __future__ import annotations

from torch import Tensor, nn


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride on the 3x3 conv), expansion 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with the same module names (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``)."""

    def __init__(self, layers: tuple[int, ...], num_classes: int, width: int) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        for i, blocks in enumerate(layers):
            stages.append(self._make_layer(width * 2**i, blocks, stride=1 if i == 0 else 2))
        self._stages = [f"layer{i}" for i in range(1, len(stages) + 1)]
        for name, stage in zip(self._stages, stages, strict=True):
            self.add_module(name, stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 ** (len(layers) - 1) * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self._stages:
            x = getattr(self, name)(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnet50_shaped(num_classes: int = 1000, width: int = 64, layers: tuple[int, ...] = (3, 4, 6, 3)) -> nn.Module:
    """A torchvision-``resnet50``-shaped model (25.6M parameters at the defaults), random init as torchvision's."""
    return ResNet(tuple(layers), num_classes, width)
