"""CSPNeXtPAFPN, RTMDet's neck (visdet ``models/necks/cspnext_pafpn.py``), NHWC.

Shapes, for three inputs C3, C4, C5 (N, H/s, W/s, c_s) at strides 8/16/32 (H, W multiples of 32, as the
scale-factor upsample needs), c3/c4/c5 = ``in_channels``, ``up`` = nearest x2, ``[a, b]`` = channel concat:
    t5 = reduce_layers.0(C5)                          1x1, c5 -> c4
    i4 = top_down_blocks.0([up(t5), C4])              CSPLayer 2c4 -> c4
    t4 = reduce_layers.1(i4)                          1x1, c4 -> c3
    o3 = top_down_blocks.1([up(t4), C3])              CSPLayer 2c3 -> c3
    o4 = bottom_up_blocks.0([downsamples.0(o3), t4])  3x3/s2 c3 -> c3; CSPLayer 2c3 -> c4
    o5 = bottom_up_blocks.1([downsamples.1(o4), t5])  3x3/s2 c4 -> c4; CSPLayer 2c4 -> c5
    P3, P4, P5 = out_convs.{0,1,2}(o3, o4, o5)        3x3 -> out_channels
The bottom-up path concatenates the *reduced* t4 / t5 (visdet overwrites ``inner_outs[0]``). The neck's CSPLayers
have no channel attention and no identity. Written for any number of levels, as visdet.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flaxdet.config import CSPNeXtPAFPNCfg
from flaxdet.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet.models.layers.csp_layer import CSPLayer


class CSPNeXtPAFPN(nnx.Module):
    def __init__(self, cfg: CSPNeXtPAFPNCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        up = dict(cfg.upsample_cfg)
        scale = up.get("scale_factor", 0)
        if set(up) - {"scale_factor", "mode"} or up.get("mode", "nearest") != "nearest" or scale < 1 \
                or not float(scale).is_integer():
            raise ValueError(f"CSPNeXtPAFPN: only upsample_cfg with mode='nearest' and an integer scale_factor is "
                             f"supported (got {up})")
        self.scale = int(scale)  # torch nearest with an integer scale factor: dst i reads src i // scale
        c = tuple(cfg.in_channels)
        common = dict(conv_cfg=cfg.conv_cfg, norm_cfg=cfg.norm_cfg, act_cfg=cfg.act_cfg, rngs=rngs)
        csp = dict(num_blocks=cfg.num_csp_blocks, add_identity=False, use_depthwise=cfg.use_depthwise,
                   use_cspnext_block=True, expand_ratio=cfg.expand_ratio, **common)
        conv = DepthwiseSeparableConvModule if cfg.use_depthwise else ConvModule
        top = range(len(c) - 1, 0, -1)
        self.reduce_layers = nnx.List([ConvModule(c[i], c[i - 1], 1, **common) for i in top])
        self.top_down_blocks = nnx.List([CSPLayer(2 * c[i - 1], c[i - 1], **csp) for i in top])
        self.downsamples = nnx.List([conv(c[i], c[i], 3, stride=2, padding=1, **common) for i in range(len(c) - 1)])
        self.bottom_up_blocks = nnx.List([CSPLayer(2 * c[i], c[i + 1], **csp) for i in range(len(c) - 1)])
        self.out_convs = nnx.List([conv(ci, cfg.out_channels, 3, padding=1, **common) for ci in c])

    def upsample(self, x):
        return jnp.repeat(jnp.repeat(x, self.scale, axis=1), self.scale, axis=2)

    def __call__(self, inputs):
        n = len(self.cfg.in_channels)
        if len(inputs) != n:
            raise ValueError("len(inputs) must match len(in_channels)")
        inner = [inputs[-1]]  # top-down: inner[0] is the current top, replaced by its reduced form
        for j, idx in enumerate(range(n - 1, 0, -1)):
            inner[0] = self.reduce_layers[j](inner[0])
            inner.insert(0, self.top_down_blocks[j](jnp.concatenate([self.upsample(inner[0]), inputs[idx - 1]], -1)))
        outs = [inner[0]]
        for idx in range(n - 1):
            outs.append(self.bottom_up_blocks[idx](
                jnp.concatenate([self.downsamples[idx](outs[-1]), inner[idx + 1]], -1)))
        return tuple(conv(o) for conv, o in zip(self.out_convs, outs))
