"""ChannelAttention (visdet ``models/layers/se_layer.py``): ``x * hardsigmoid(fc(avgpool(x)))``, ``fc`` a 1x1
conv with bias; hardsigmoid = ``clip(x + 3, 0, 6) / 6``."""
from __future__ import annotations

from torch import nn


class ChannelAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, 1, 0, bias=True)
        self.act = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.act(self.fc(self.global_avgpool(x)))
