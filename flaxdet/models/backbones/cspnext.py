"""CSPNeXt, RTMDet's backbone (visdet ``models/backbones/cspnext.py``), NHWC.

Shapes (P5, widen w, input (N, H, W, 3)): stem (N, ceil(H/2), ceil(W/2), int(64w)); stage i (1..4) halves H, W
again (3x3/s2 conv: ceil) and has int(c_i w) channels, c = 128/256/512/1024. ``out_indices`` count the stem as 0:
the default (2, 3, 4) gives C3, C4, C5 at strides 8, 16, 32.
Keys: ``stem.{0,1,2}`` ConvModules; ``stage{i}.0`` the 3x3/s2 conv, ``stage{i}.1`` the CSPLayer -- or, in the
last stage (``use_spp``), ``.1`` the SPPBottleneck and ``.2`` the CSPLayer.
"""
from __future__ import annotations

from flax import nnx

from flaxdet.config import CSPNeXtCfg
from flaxdet.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet.models.layers.csp_layer import CSPLayer
from flaxdet.models.layers.spp_layer import SPPBottleneck
from flaxdet.nn import BatchNorm2d, GroupNorm, Sequential


class CSPNeXt(nnx.Module):
    # [in, out, num_blocks, add_identity, use_spp] per stage, before widen/deepen
    arch_settings = {
        "P5": ((64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False),
               (512, 1024, 3, False, True)),
        "P6": ((64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False),
               (512, 768, 3, True, False), (768, 1024, 3, False, True)),
    }

    def __init__(self, cfg: CSPNeXtCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        arch = cfg.arch_ovewrite or self.arch_settings[cfg.arch]
        if not set(cfg.out_indices) <= set(range(len(arch) + 1)):
            raise ValueError("out_indices must be within valid stage indices")
        if cfg.frozen_stages not in range(-1, len(arch) + 1):
            raise ValueError(f"frozen_stages must be in range(-1, {len(arch) + 1}), got {cfg.frozen_stages}")
        w = cfg.widen_factor
        common = dict(norm_cfg=cfg.norm_cfg, act_cfg=cfg.act_cfg, rngs=rngs)
        conv = DepthwiseSeparableConvModule if cfg.use_depthwise else ConvModule
        stem = int(arch[0][0] * w // 2)
        self.stem = Sequential(ConvModule(3, stem, 3, stride=2, padding=1, **common),
                               ConvModule(stem, stem, 3, stride=1, padding=1, **common),
                               ConvModule(stem, int(arch[0][0] * w), 3, stride=1, padding=1, **common))
        for i, (cin, cout, n, add_identity, use_spp) in enumerate(arch):
            cin, cout, n = int(cin * w), int(cout * w), max(round(n * cfg.deepen_factor), 1)
            stage = [conv(cin, cout, 3, stride=2, padding=1, conv_cfg=cfg.conv_cfg, **common)]
            if use_spp:
                stage.append(SPPBottleneck(cout, cout, cfg.spp_kernel_sizes, conv_cfg=cfg.conv_cfg, **common))
            stage.append(CSPLayer(cout, cout, num_blocks=n, add_identity=add_identity,
                                  use_depthwise=cfg.use_depthwise, use_cspnext_block=True,
                                  expand_ratio=cfg.expand_ratio, channel_attention=cfg.channel_attention,
                                  conv_cfg=cfg.conv_cfg, **common))
            setattr(self, f"stage{i + 1}", Sequential(*stage))
        self.layers = ("stem",) + tuple(f"stage{i + 1}" for i in range(len(arch)))

    def __call__(self, x):
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.cfg.out_indices:
                outs.append(x)
        return tuple(outs)

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter path prefixes that visdet freezes, for the train step: the stem and stages up to
        ``frozen_stages``, and every norm layer when ``norm_cfg.requires_grad`` is false."""
        out = tuple(self.layers[: self.cfg.frozen_stages + 1])
        if not self.cfg.norm_cfg.requires_grad:
            out += tuple(".".join(map(str, path)) for path, node in nnx.iter_graph(self)
                         if isinstance(node, (BatchNorm2d, GroupNorm)))
        return out
