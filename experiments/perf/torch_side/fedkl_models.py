"""Our PyTorch re-implementation of the official FedKL architectures (LeNet_kl, ResNet-20_kl) and DLG's LeNet.

Written from the paper's code as described in shared/reference/fedkl_paper_and_code.md §1.1-1.2:
the lock block is conv -> BatchNorm2d(affine=False) -> gamma * n + beta with gamma, beta =
relu(Linear(key)), the same key for both; only the first conv layer of each backbone is locked.
"""

import torch
from torch import nn
import torch.nn.functional as F

KEY_DIM = 1024


class DefenseBlock(nn.Module):
    """FedKL's lock block: conv, non-affine BatchNorm, key-driven per-channel scale and shift."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias, key_dim=KEY_DIM):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels, affine=False)
        self.scale_fc = nn.Linear(key_dim, out_channels)
        self.shift_fc = nn.Linear(key_dim, out_channels)

    def forward(self, x, key):
        n = self.bn(self.conv(x))
        gamma = F.relu(self.scale_fc(key)).view(1, -1, 1, 1)
        beta = F.relu(self.shift_fc(key)).view(1, -1, 1, 1)
        return gamma * n + beta


class LeNetKL(nn.Module):
    """LeNet_kl: locked conv 3->12 k5 s2 p2, sigmoid, two more 12-channel convs, one FC."""

    def __init__(self, in_channels=3, num_classes=10, image_size=32, key_dim=KEY_DIM):
        super().__init__()
        self.register_buffer("key", torch.rand(key_dim))
        self.lock = DefenseBlock(in_channels, 12, 5, 2, 2, bias=True, key_dim=key_dim)
        self.conv2 = nn.Conv2d(12, 12, 5, 2, 2)
        self.conv3 = nn.Conv2d(12, 12, 5, 1, 2)
        side = (image_size + 3) // 4
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x):
        x = torch.sigmoid(self.lock(x, self.key))
        x = torch.sigmoid(self.conv2(x))
        x = torch.sigmoid(self.conv3(x))
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    """torchvision-style BasicBlock with a 1x1-conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet20KL(nn.Module):
    """ResNet-20_kl: locked conv 3->16 k3 s1 p1 (no bias), ReLU, 3x3 BasicBlocks at 16/32/64, avg-pool, FC."""

    def __init__(self, in_channels=3, num_classes=10, key_dim=KEY_DIM, blocks=3):
        super().__init__()
        self.register_buffer("key", torch.rand(key_dim))
        self.lock = DefenseBlock(in_channels, 16, 3, 1, 1, bias=False, key_dim=key_dim)
        layers, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(BasicBlock(channels, width, stride if b == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.lock(x, self.key))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DLGLeNet(nn.Module):
    """DLG's LeNet (no lock): three 5x5 sigmoid convs with 12 channels and one FC, weights U(-0.5, 0.5)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, 5, 2, 2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, 2, 2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, 1, 2),
            nn.Sigmoid(),
        )
        side = (image_size + 3) // 4
        self.fc = nn.Linear(12 * side * side, num_classes)
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def build(name, num_classes=10):
    if name == "lenet":
        return LeNetKL(num_classes=num_classes)
    if name == "resnet20":
        return ResNet20KL(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}")
