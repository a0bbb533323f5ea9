"""SPPBottleneck (visdet ``models/layers/spp_layer.py``), NHWC.

Shapes: x (N, H, W, Cin) -conv1-> y (N, H, W, Cin//2); cat [y, maxpool_k(y) for k] (N, H, W, (1+K)*Cin//2)
-conv2-> (N, H, W, Cout). The pools have stride 1 and padding k//2 (implicit -inf), so H, W are kept.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flaxdet.config import NormCfg
from flaxdet.models.layers import ConvModule
from flaxdet.nn import max_pool2d

# visdet's class defaults (the RTMDet presets pass their own): BN(momentum=0.03, eps=0.001) and Swish, which is
# x * sigmoid(x) like SiLU.
BN = NormCfg(momentum=0.03, eps=0.001)
SILU = (("type", "SiLU"),)


class SPPBottleneck(nnx.Module):
    def __init__(self, in_channels, out_channels, kernel_sizes=(5, 9, 13), conv_cfg=None, norm_cfg=BN,
                 act_cfg=SILU, *, rngs: nnx.Rngs):
        mid = in_channels // 2
        self.kernel_sizes = tuple(kernel_sizes)
        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg, rngs=rngs)
        self.conv1 = ConvModule(in_channels, mid, 1, **common)
        self.conv2 = ConvModule(mid * (len(self.kernel_sizes) + 1), out_channels, 1, **common)

    def __call__(self, x):
        x = self.conv1(x)
        x = jnp.concatenate([x] + [max_pool2d(x, k, 1, k // 2) for k in self.kernel_sizes], axis=-1)
        return self.conv2(x)
