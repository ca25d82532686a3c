"""Small hand-written models with random weights (nothing is downloaded), for structural pruning.

Each factory builds a plain ``nn.Module``: a ResNet-50-shaped CNN (:func:`resnet50_shaped`), a
MobileNet-v1-like depthwise-separable CNN (:func:`depthwise_separable`) and a small ViT-style encoder
(:func:`vit_shaped`). The defaults of ``resnet50_shaped`` are ResNet-50's own sizes (25.6M parameters,
224x224 images); tests shrink every one of them to a few thousand parameters.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (stride) -> 1x1 (expand by 4), each with BatchNorm, added to the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), four stages of bottlenecks, average pool, fc."""

    def __init__(self, num_classes: int, width: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = width
        for stage, blocks in enumerate(layers):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for index in range(blocks):
                stage_blocks.append(Bottleneck(channels, planes, stride if index == 0 else 1))
                channels = planes * Bottleneck.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_shaped(num_classes: int = 1000, width: int = 64, layers: tuple[int, ...] = (3, 4, 6, 3)) -> nn.Module:
    """A ResNet with bottleneck blocks; at the defaults shaped like ResNet-50 (25,557,032 parameters).

    ``width`` is the stem's output channels (stage ``i`` has ``width * 2**i`` inner and four times as many
    outer channels); ``layers`` the number of blocks per stage.
    """
    return ResNet(num_classes, width, layers)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv (one filter per channel), then pointwise 1x1 conv, each with BN and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels)
        self.pointwise = _conv_bn_relu(in_channels, out_channels, 1, 1, groups=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def depthwise_separable(
    num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 128), strides: tuple[int, ...] = (1, 2, 2)
) -> nn.Module:
    """A MobileNet-v1-like CNN: a 3x3/2 stem to ``widths[0]`` channels, one depthwise-separable block per
    further width (block ``i`` strides by ``strides[i]``), global average pool, flatten, Linear."""
    if len(strides) != len(widths) - 1:
        raise ValueError(f"{len(widths) - 1} blocks need as many strides, got {len(strides)}")
    blocks = [
        DepthwiseSeparable(c_in, c_out, stride)
        for c_in, c_out, stride in zip(widths, widths[1:], strides, strict=False)
    ]
    return nn.Sequential(
        _conv_bn_relu(3, widths[0], 3, 2, groups=1),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[-1], num_classes),
    )


class Attention(nn.Module):
    """Multi-head self-attention from separate q, k, v and output projections; heads by reshape."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, tokens, head_dim)
            return t.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)

        # the number of heads comes from the projections' widths (-1), so heads can be removed
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.out(mixed)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding conv, class token, learned position embedding, encoder blocks, norm, head."""

    def __init__(
        self, image_size: int, patch_size: int, dim: int, depth: int, heads: int, hidden: int, num_classes: int
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_shaped(
    image_size: int = 32,
    patch_size: int = 8,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: int = 4,
    num_classes: int = 10,
) -> nn.Module:
    """A ViT-style classifier: ``depth`` pre-norm blocks of ``heads``-head attention and a ``mlp_ratio * dim``
    MLP over ``(image_size / patch_size)**2`` patches plus a class token."""
    return VisionTransformer(image_size, patch_size, dim, depth, heads, dim * mlp_ratio, num_classes)
