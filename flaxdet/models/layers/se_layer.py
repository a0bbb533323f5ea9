"""ChannelAttention (visdet ``models/layers/se_layer.py``), NHWC.

Shapes: x (N, H, W, C) -> x * hardsigmoid(fc(mean_hw(x))), the gate (N, 1, 1, C).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flaxdet.nn import Conv2d


def hardsigmoid(x):
    """torch.nn.Hardsigmoid: relu6(x + 3) / 6."""
    return jnp.clip(x + 3, 0, 6) / 6


class ChannelAttention(nnx.Module):
    """Global average pool -> ``fc`` (1x1 conv with bias, C -> C) -> hardsigmoid -> scale the input."""

    def __init__(self, channels, *, rngs: nnx.Rngs):
        self.fc = Conv2d(channels, channels, 1, bias=True, rngs=rngs)

    def __call__(self, x):
        return x * hardsigmoid(self.fc(jnp.mean(x, axis=(1, 2), keepdims=True)))
