"""CSP layers (visdet ``models/layers/csp_layer.py``): DarknetBottleneck, CSPNeXtBlock, CSPLayer; NHWC.

Shapes: a block maps (N, H, W, Cin) -> (N, H, W, Cout) (stride 1). CSPLayer with mid = int(Cout * expand_ratio):
main = blocks(main_conv(x)) and short = short_conv(x), both (N, H, W, mid); z = cat[main, short] (N, H, W, 2 mid),
optionally z * hardsigmoid(fc(mean_hw(z))) (``attention``); final_conv(z) (N, H, W, Cout).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flaxdet.config import NormCfg
from flaxdet.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet.models.layers.se_layer import ChannelAttention
from flaxdet.nn import Sequential

# visdet's class defaults (the RTMDet presets pass their own): BN(momentum=0.03, eps=0.001); Swish (Darknet /
# CSPLayer) and SiLU (CSPNeXtBlock) are both x * sigmoid(x).
BN = NormCfg(momentum=0.03, eps=0.001)
SILU = (("type", "SiLU"),)


class DarknetBottleneck(nnx.Module):
    """1x1 ConvModule (cin -> hidden) then 3x3 (ConvModule or depthwise-separable) (hidden -> cout), + x."""

    def __init__(self, in_channels, out_channels, expansion=0.5, add_identity=True, use_depthwise=False,
                 conv_cfg=None, norm_cfg=BN, act_cfg=SILU, *, rngs: nnx.Rngs):
        hidden = int(out_channels * expansion)
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg, rngs=rngs)
        conv = DepthwiseSeparableConvModule if use_depthwise else ConvModule
        self.conv1 = ConvModule(in_channels, hidden, 1, **common)
        self.conv2 = conv(hidden, out_channels, 3, stride=1, padding=1, **common)
        self.add_identity = add_identity and in_channels == out_channels

    def __call__(self, x):
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPNeXtBlock(nnx.Module):
    """3x3 conv (cin -> hidden; conv_cfg not passed, as visdet) then a depthwise-separable ``kernel_size``
    conv (hidden -> cout), + x when ``add_identity`` and cin == cout."""

    def __init__(self, in_channels, out_channels, expansion=0.5, add_identity=True, use_depthwise=False,
                 kernel_size=5, conv_cfg=None, norm_cfg=BN, act_cfg=SILU, *, rngs: nnx.Rngs):
        hidden = int(out_channels * expansion)
        conv = DepthwiseSeparableConvModule if use_depthwise else ConvModule
        self.conv1 = conv(in_channels, hidden, 3, stride=1, padding=1, norm_cfg=norm_cfg, act_cfg=act_cfg, rngs=rngs)
        self.conv2 = DepthwiseSeparableConvModule(hidden, out_channels, kernel_size, stride=1,
                                                  padding=kernel_size // 2, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                                  act_cfg=act_cfg, rngs=rngs)
        self.add_identity = add_identity and in_channels == out_channels

    def __call__(self, x):
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nnx.Module):
    """Cross Stage Partial layer: children main_conv, short_conv, final_conv (1x1 ConvModules), blocks
    (``num_blocks`` mid -> mid blocks, expansion 1.0) and, with ``channel_attention``, ``attention``."""

    def __init__(self, in_channels, out_channels, expand_ratio=0.5, num_blocks=1, add_identity=True,
                 use_depthwise=False, use_cspnext_block=False, channel_attention=False, conv_cfg=None, norm_cfg=BN,
                 act_cfg=SILU, *, rngs: nnx.Rngs):
        block = CSPNeXtBlock if use_cspnext_block else DarknetBottleneck
        mid = int(out_channels * expand_ratio)
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg, rngs=rngs)
        self.channel_attention = channel_attention
        self.main_conv = ConvModule(in_channels, mid, 1, **common)
        self.short_conv = ConvModule(in_channels, mid, 1, **common)
        self.final_conv = ConvModule(2 * mid, out_channels, 1, **common)
        self.blocks = Sequential(*[block(mid, mid, 1.0, add_identity, use_depthwise, **common)
                                   for _ in range(num_blocks)])
        if channel_attention:
            self.attention = ChannelAttention(2 * mid, rngs=rngs)

    def __call__(self, x):
        z = jnp.concatenate([self.blocks(self.main_conv(x)), self.short_conv(x)], axis=-1)
        if self.channel_attention:
            z = self.attention(z)
        return self.final_conv(z)
