"""SPPBottleneck (visdet ``models/layers/spp_layer.py``): 1x1 conv to c/2, concat with stride-1 max pools
(5, 9, 13; padding k//2 acts as -inf), 1x1 conv to ``out_channels``."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet_reference.models.layers import ConvModule


class SPPBottleneck(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_sizes=(5, 9, 13), conv_cfg=None, norm_cfg=None,
                 act_cfg=(("type", "SiLU"),)):
        super().__init__()
        mid = in_channels // 2
        self.conv1 = ConvModule(in_channels, mid, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.poolings = nn.ModuleList([nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes])
        self.conv2 = ConvModule(mid * (len(kernel_sizes) + 1), out_channels, 1, conv_cfg=conv_cfg,
                                norm_cfg=norm_cfg, act_cfg=act_cfg)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))
