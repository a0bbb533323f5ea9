"""CSPNeXt (visdet ``models/backbones/cspnext.py``), the RTMDet backbone, inference.

Stem: three 3x3 ConvModules (3 -> c/2 stride 2, c/2 -> c/2, c/2 -> c) with c = int(64 * widen). Stage i
(``stage{i}``): a 3x3 stride-2 ConvModule, [last P5 stage: SPPBottleneck], CSPLayer (CSPNeXt blocks,
``max(round(n * deepen), 1)`` of them, channel attention). Outputs the ``out_indices`` of [stem, stage1..]."""
from __future__ import annotations

from torch import nn

from flaxdet.config import CSPNeXtCfg
from flaxdet_reference.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet_reference.models.layers.csp_layer import CSPLayer
from flaxdet_reference.models.layers.spp_layer import SPPBottleneck


class CSPNeXt(nn.Module):
    # [in, out, num_blocks, add_identity, use_spp]
    arch_settings = {
        "P5": [[64, 128, 3, True, False], [128, 256, 6, True, False], [256, 512, 6, True, False],
               [512, 1024, 3, False, True]],
        "P6": [[64, 128, 3, True, False], [128, 256, 6, True, False], [256, 512, 6, True, False],
               [512, 768, 3, True, False], [768, 1024, 3, False, True]],
    }

    def __init__(self, cfg: CSPNeXtCfg):
        super().__init__()
        self.cfg = cfg
        arch = [list(a) for a in cfg.arch_ovewrite] if cfg.arch_ovewrite else self.arch_settings[cfg.arch]
        if not set(cfg.out_indices) <= set(range(len(arch) + 1)):
            raise ValueError("out_indices must be within valid stage indices")
        self.out_indices = tuple(cfg.out_indices)
        w = cfg.widen_factor
        common = dict(conv_cfg=cfg.conv_cfg, norm_cfg=cfg.norm_cfg, act_cfg=cfg.act_cfg)
        stem = int(arch[0][0] * w // 2)
        self.stem = nn.Sequential(
            ConvModule(3, stem, 3, padding=1, stride=2, norm_cfg=cfg.norm_cfg, act_cfg=cfg.act_cfg),
            ConvModule(stem, stem, 3, padding=1, stride=1, norm_cfg=cfg.norm_cfg, act_cfg=cfg.act_cfg),
            ConvModule(stem, int(arch[0][0] * w), 3, padding=1, stride=1, norm_cfg=cfg.norm_cfg,
                       act_cfg=cfg.act_cfg))
        self.layers = ["stem"]
        conv = DepthwiseSeparableConvModule if cfg.use_depthwise else ConvModule
        for i, (cin, cout, n, add_identity, use_spp) in enumerate(arch):
            cin, cout, n = int(cin * w), int(cout * w), max(round(n * cfg.deepen_factor), 1)
            stage = [conv(cin, cout, 3, stride=2, padding=1, **common)]
            if use_spp:
                stage.append(SPPBottleneck(cout, cout, kernel_sizes=tuple(cfg.spp_kernel_sizes), **common))
            stage.append(CSPLayer(cout, cout, num_blocks=n, add_identity=add_identity,
                                  use_depthwise=cfg.use_depthwise, expand_ratio=cfg.expand_ratio,
                                  channel_attention=cfg.channel_attention, **common))
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))
            self.layers.append(f"stage{i + 1}")

    def forward(self, x):
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
