"""FPN (visdet ``models/necks/fpn.py``), NHWC."""
from __future__ import annotations

from flax import nnx

from flaxdet.config import FPNCfg
from flaxdet.models.layers import ConvModule
from flaxdet.nn import interpolate_nearest, relu


class FPN(nnx.Module):
    def __init__(self, cfg: FPNCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        cin, out = tuple(cfg.in_channels), cfg.out_channels
        num_ins = len(cin)
        if cfg.end_level in (-1, num_ins - 1):
            self.backbone_end_level = num_ins
        else:
            self.backbone_end_level = cfg.end_level + 1
        if dict(cfg.upsample_cfg).get("mode", "nearest") != "nearest" or "scale_factor" in cfg.upsample_cfg:
            raise ValueError("FPN: only upsample_cfg=dict(mode='nearest') (size-based) is supported")
        add = cfg.add_extra_convs
        self.add_extra_convs = "on_input" if add is True else add
        common = dict(conv_cfg=cfg.conv_cfg, act_cfg=cfg.act_cfg, inplace=False, rngs=rngs)
        lateral, fpn = [], []
        for i in range(cfg.start_level, self.backbone_end_level):
            lateral.append(ConvModule(cin[i], out, 1, norm_cfg=None if cfg.no_norm_on_lateral else cfg.norm_cfg,
                                      **common))
            fpn.append(ConvModule(out, out, 3, padding=1, norm_cfg=cfg.norm_cfg, **common))
        extra = cfg.num_outs - self.backbone_end_level + cfg.start_level
        if self.add_extra_convs and extra >= 1:
            for i in range(extra):
                c = cin[self.backbone_end_level - 1] if i == 0 and self.add_extra_convs == "on_input" else out
                fpn.append(ConvModule(c, out, 3, stride=2, padding=1, norm_cfg=cfg.norm_cfg, **common))
        self.lateral_convs = nnx.List(lateral)
        self.fpn_convs = nnx.List(fpn)

    def __call__(self, inputs):
        cfg = self.cfg
        lat = [conv(inputs[i + cfg.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(lat)
        for i in range(used - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + interpolate_nearest(lat[i], lat[i - 1].shape[1:3])
        outs = [self.fpn_convs[i](lat[i]) for i in range(used)]
        if cfg.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(cfg.num_outs - used):
                    outs.append(outs[-1][:, ::2, ::2, :])  # F.max_pool2d(x, 1, stride=2)
            else:
                src = {"on_input": inputs[self.backbone_end_level - 1], "on_lateral": lat[-1],
                       "on_output": outs[-1]}[self.add_extra_convs]
                outs.append(self.fpn_convs[used](src))
                for i in range(used + 1, cfg.num_outs):
                    x = relu(outs[-1]) if cfg.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](x))
        return tuple(outs)
