"""FPN (visdet ``models/necks/fpn.py``)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from flaxdet.config import FPNCfg
from flaxdet_reference.models.layers import ConvModule


class FPN(nn.Module):
    def __init__(self, cfg: FPNCfg):
        super().__init__()
        self.cfg = cfg
        in_channels, out = tuple(cfg.in_channels), cfg.out_channels
        self.num_ins = len(in_channels)
        self.num_outs = cfg.num_outs
        self.relu_before_extra_convs = cfg.relu_before_extra_convs
        self.upsample_cfg = dict(cfg.upsample_cfg)
        if cfg.end_level in (-1, self.num_ins - 1):
            self.backbone_end_level = self.num_ins
            if cfg.num_outs < self.num_ins - cfg.start_level:
                raise ValueError("FPN: num_outs must be >= number of used input levels")
        else:
            self.backbone_end_level = cfg.end_level + 1
            if cfg.num_outs != cfg.end_level - cfg.start_level + 1:
                raise ValueError("FPN: num_outs must equal end_level - start_level + 1")
        self.start_level = cfg.start_level
        add_extra = cfg.add_extra_convs
        if isinstance(add_extra, str):
            if add_extra not in ("on_input", "on_lateral", "on_output"):
                raise ValueError(f"FPN: add_extra_convs={add_extra!r} is not one of on_input/on_lateral/on_output")
        elif add_extra:
            add_extra = "on_input"
        self.add_extra_convs = add_extra
        common = dict(conv_cfg=cfg.conv_cfg, act_cfg=cfg.act_cfg, inplace=False)
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(self.start_level, self.backbone_end_level):
            self.lateral_convs.append(ConvModule(
                in_channels[i], out, 1, norm_cfg=None if cfg.no_norm_on_lateral else cfg.norm_cfg, **common))
            self.fpn_convs.append(ConvModule(out, out, 3, padding=1, norm_cfg=cfg.norm_cfg, **common))
        extra_levels = cfg.num_outs - self.backbone_end_level + self.start_level
        if add_extra and extra_levels >= 1:
            for i in range(extra_levels):
                cin = in_channels[self.backbone_end_level - 1] if i == 0 and add_extra == "on_input" else out
                self.fpn_convs.append(ConvModule(cin, out, 3, stride=2, padding=1, norm_cfg=cfg.norm_cfg, **common))

    def forward(self, inputs):
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        for i in range(used - 1, 0, -1):
            if "scale_factor" in self.upsample_cfg:
                up = F.interpolate(laterals[i], **self.upsample_cfg)
            else:
                up = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], **self.upsample_cfg)
            laterals[i - 1] = laterals[i - 1] + up
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > len(outs):
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                source = {"on_input": inputs[self.backbone_end_level - 1],
                          "on_lateral": laterals[-1], "on_output": outs[-1]}[self.add_extra_convs]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    x = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](x))
        return tuple(outs)
