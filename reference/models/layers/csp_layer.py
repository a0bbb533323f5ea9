"""CSPNeXtBlock and CSPLayer (visdet ``models/layers/csp_layer.py``), the CSPNeXt variant only (visdet's
CSPNeXt and CSPNeXtPAFPN always build ``use_cspnext_block=True``; DarknetBottleneck is not mirrored).

CSPLayer: ``final_conv(attention?(cat[blocks(main_conv(x)), short_conv(x)]))``, all three 1x1 with
``mid = int(out * expand_ratio)``. CSPNeXtBlock(c -> c): 3x3 ConvModule, then a depthwise-separable 5x5
(``conv2.depthwise`` / ``conv2.pointwise``), plus the identity if ``add_identity`` and c_in == c_out."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet_reference.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet_reference.models.layers.se_layer import ChannelAttention


class CSPNeXtBlock(nn.Module):
    def __init__(self, in_channels, out_channels, expansion=0.5, add_identity=True, use_depthwise=False,
                 kernel_size=5, conv_cfg=None, norm_cfg=None, act_cfg=(("type", "SiLU"),)):
        super().__init__()
        hidden = int(out_channels * expansion)
        conv = DepthwiseSeparableConvModule if use_depthwise else ConvModule
        # visdet does not hand conv_cfg to conv1
        self.conv1 = conv(in_channels, hidden, 3, stride=1, padding=1, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.conv2 = DepthwiseSeparableConvModule(hidden, out_channels, kernel_size, stride=1,
                                                  padding=kernel_size // 2, conv_cfg=conv_cfg,
                                                  norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    def __init__(self, in_channels, out_channels, expand_ratio=0.5, num_blocks=1, add_identity=True,
                 use_depthwise=False, channel_attention=False, conv_cfg=None, norm_cfg=None,
                 act_cfg=(("type", "SiLU"),)):
        super().__init__()
        mid = int(out_channels * expand_ratio)
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.channel_attention = channel_attention
        self.main_conv = ConvModule(in_channels, mid, 1, **common)
        self.short_conv = ConvModule(in_channels, mid, 1, **common)
        self.final_conv = ConvModule(2 * mid, out_channels, 1, **common)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, mid, 1.0, add_identity, use_depthwise, **common)
                                      for _ in range(num_blocks)])
        if channel_attention:
            self.attention = ChannelAttention(2 * mid)

    def forward(self, x):
        x_short = self.short_conv(x)
        x = torch.cat((self.blocks(self.main_conv(x)), x_short), dim=1)
        if self.channel_attention:
            x = self.attention(x)
        return self.final_conv(x)
