"""The bundled tiny architectures (input 1x28x28, 10 classes).

Each one stresses quantization differently (see catalog.py). They use only standard modules and
write residual adds as `out = out + identity`, so torch.fx traces them and sees every add, matmul
and softmax as a node.
"""
from __future__ import annotations

import torch
from torch import nn


# --------------------------------------------------------------------------- resnet8

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNet8(nn.Module):
    """conv-bn-relu stem, three basic blocks (16/32/64 channels, strides 1/2/2), avgpool, fc."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


# --------------------------------------------------------------------------- mobilenet_tiny

def conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: 3x3 depthwise conv-bn-relu6, then 1x1 pointwise conv-bn-relu6."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = conv_bn_relu6(cin, cin, 3, stride, groups=cin)
        self.pw = conv_bn_relu6(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block with stride 1: expand 1x1, depthwise 3x3, linear 1x1 projection, residual add."""

    def __init__(self, channels: int, expand: int):
        super().__init__()
        hidden = channels * expand
        self.expand = conv_bn_relu6(channels, hidden, 1)
        self.dw = conv_bn_relu6(hidden, hidden, 3, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.project(self.dw(self.expand(x)))
        out = out + x
        return out


class MobileNetTiny(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.stem = conv_bn_relu6(in_chans, 16, 3, 1)                # 28x28
        self.block1 = DepthwiseSeparable(16, 32, 2)                   # 14x14
        self.block2 = InvertedResidual(32, 2)
        self.block3 = DepthwiseSeparable(32, 64, 2)                   # 7x7
        self.block4 = InvertedResidual(64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.block4(self.block3(self.block2(self.block1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


# --------------------------------------------------------------------------- lenet5 / mlp

class LeNet5(nn.Module):
    """LeNet-5 style, no batch norm: conv5-relu-maxpool x2, then fc 120-84-classes."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


class MLP(nn.Module):
    """Two hidden layers (256, 128) on the flattened 28x28 image."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, hidden=(256, 128)):
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(in_chans * 28 * 28, hidden[0])
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x):
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


# --------------------------------------------------------------------------- vit_tiny

class Attention(nn.Module):
    """Multi-head self-attention from nn.Linear + torch.matmul + softmax, so fx sees both matmuls."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                           # each (b, heads, n, head_dim)
        attn = self.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.proj(out)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return x


class ViTTiny(nn.Module):
    """7x7 patches -> 16 tokens + cls token, pre-norm transformer blocks, LayerNorm, linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, patch: int = 7,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        num_patches = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.flatten = nn.Flatten(2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.flatten(self.patch_embed(x)).transpose(1, 2)      # (b, 16, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------- CIFAR architectures
# The two models of the MARViN / AdaPT reference recipes (3x32x32 input). Architecture only: no weights
# are bundled (they need CIFAR data to train); configs/imagenet/marvin_cifar.yaml trains them.

class ResNetCIFAR(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6n+2 (ResNet-20: n = 3): a 16-channel conv-bn-relu stem, three
    stages of n basic blocks (16/32/64 channels, strides 1/2/2, 1x1 conv + BN shortcuts where the shape
    changes), global average pool, fc."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():           # He initialization of the convs, BN at identity
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class AlexNetCIFAR(nn.Module):
    """The small CIFAR AlexNet of the reference: five convs (64 11x11/4, 192 5x5, 384, 256, 256 3x3) with
    ReLU and three 2x2 max pools, no batch norm, then one fc from the 256 features (32x32 input -> 1x1)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 64, 11, 4, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.features(x)))
