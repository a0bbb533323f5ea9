"""CSPNeXtPAFPN (visdet ``models/necks/cspnext_pafpn.py``): top-down (1x1 reduce, nearest x2 upsample, cat,
CSPLayer), bottom-up (3x3 stride-2 downsample, cat with the *reduced* top-down map, CSPLayer), then a 3x3
``out_convs`` ConvModule per level. Neck CSPLayers: no identity, no channel attention. H and W must be
multiples of the coarsest stride (the upsample is by scale factor)."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import CSPNeXtPAFPNCfg
from flaxdet_reference.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet_reference.models.layers.csp_layer import CSPLayer


class CSPNeXtPAFPN(nn.Module):
    def __init__(self, cfg: CSPNeXtPAFPNCfg):
        super().__init__()
        self.cfg = cfg
        cin = self.in_channels = list(cfg.in_channels)
        common = dict(conv_cfg=cfg.conv_cfg, norm_cfg=cfg.norm_cfg, act_cfg=cfg.act_cfg)
        csp = dict(num_blocks=cfg.num_csp_blocks, add_identity=False, use_depthwise=cfg.use_depthwise,
                   expand_ratio=cfg.expand_ratio, **common)
        conv = DepthwiseSeparableConvModule if cfg.use_depthwise else ConvModule
        self.upsample = nn.Upsample(**dict(cfg.upsample_cfg))
        self.reduce_layers = nn.ModuleList()
        self.top_down_blocks = nn.ModuleList()
        for idx in range(len(cin) - 1, 0, -1):
            self.reduce_layers.append(ConvModule(cin[idx], cin[idx - 1], 1, **common))
            self.top_down_blocks.append(CSPLayer(cin[idx - 1] * 2, cin[idx - 1], **csp))
        self.downsamples = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for idx in range(len(cin) - 1):
            self.downsamples.append(conv(cin[idx], cin[idx], 3, stride=2, padding=1, **common))
            self.bottom_up_blocks.append(CSPLayer(cin[idx] * 2, cin[idx + 1], **csp))
        self.out_convs = nn.ModuleList([conv(c, cfg.out_channels, 3, padding=1, **common) for c in cin])

    def forward(self, inputs):
        n = len(self.in_channels)
        if len(inputs) != n:
            raise ValueError("len(inputs) must match len(in_channels)")
        inner = [inputs[-1]]
        for idx in range(n - 1, 0, -1):
            high = inner[0] = self.reduce_layers[n - 1 - idx](inner[0])
            inner.insert(0, self.top_down_blocks[n - 1 - idx](torch.cat([self.upsample(high), inputs[idx - 1]], 1)))
        outs = [inner[0]]
        for idx in range(n - 1):
            outs.append(self.bottom_up_blocks[idx](torch.cat([self.downsamples[idx](outs[-1]), inner[idx + 1]], 1)))
        return tuple(conv(o) for conv, o in zip(self.out_convs, outs))
