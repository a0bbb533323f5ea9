"""Transformer bricks of the Swin backbone, NHWC: visdet's ``AdaptivePadding``, ``PatchEmbed``,
``PatchMerging`` (``visdet/models/layers/__init__.py``) and ``FFN`` (``visdet/cv/cnn/bricks/transformer.py``).
Attribute trees = visdet's state_dict keys (``proj``, ``norm``, ``reduction``, ``layers.0.0``, ``layers.1``).

Randomness (dropout, stochastic depth) is explicit: every ``__call__`` takes ``key``; ``key=None`` is
inference (identity), as visdet in eval mode.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.nn import Conv2d, LayerNorm, Linear, Sequential


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def dropout(x, rate: float, key):
    """nn.Dropout: zero with probability ``rate``, scale the rest by 1/(1-rate). Identity without a key."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(x, rate: float, key):
    """Stochastic depth: the whole sample (leading axis) is dropped with probability ``rate`` and the
    kept ones are scaled by 1/(1-rate). Identity without a key."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_key(key, n):
    return (None,) * n if key is None else tuple(jax.random.split(key, n))


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # nn.GELU(): the exact erf form


def adaptive_pad(x, kernel_size, stride, dilation=1, mode="corner"):
    """visdet AdaptivePadding on NHWC: zero padding so the filter covers every input pixel."""
    pads = []
    for size, k, s, d in zip(x.shape[1:3], _pair(kernel_size), _pair(stride), _pair(dilation)):
        pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
    (ph, pw) = pads
    if ph == 0 and pw == 0:
        return x
    if mode == "corner":
        cfg = ((0, 0), (0, ph), (0, pw), (0, 0))
    elif mode == "same":
        cfg = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
    else:
        raise ValueError(f"AdaptivePadding: padding must be 'same' or 'corner', got {mode!r}")
    return jnp.pad(x, cfg)


class PatchEmbed(nnx.Module):
    """Conv patchify (``proj``) after corner padding, then optional LayerNorm (``norm``). NHWC in and out."""

    def __init__(self, in_channels=3, embed_dims=96, kernel_size=4, stride=None, padding="corner", dilation=1,
                 bias=True, norm_cfg=None, *, rngs: nnx.Rngs):
        self.kernel_size = _pair(kernel_size)
        self.stride = self.kernel_size if stride is None else _pair(stride)
        self.dilation = _pair(dilation)
        self.adaptive = padding if isinstance(padding, str) else None
        conv_pad = 0 if isinstance(padding, str) else padding
        self.proj = Conv2d(in_channels, embed_dims, self.kernel_size, self.stride, conv_pad, self.dilation,
                           bias=bias, rngs=rngs)
        self.norm = LayerNorm(embed_dims) if norm_cfg is not None else None

    def __call__(self, x):
        if self.adaptive is not None:
            x = adaptive_pad(x, self.kernel_size, self.stride, self.dilation, self.adaptive)
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nnx.Module):
    """s x s neighbours -> one token (NHWC): zero-pad H, W to multiples of s (bottom/right), lay the
    neighbours out channel-major -- output channel ``c*s*s + i*s + j`` holds channel c of neighbour (i, j),
    nn.Unfold's order -- then LayerNorm(s*s*C) (``norm``, always present in visdet) and ``reduction``
    Linear(s*s*C, out, no bias)."""

    def __init__(self, in_channels, out_channels, stride=2, norm_cfg=None, *, rngs: nnx.Rngs):
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.reduction = Linear(stride * stride * in_channels, out_channels, bias=False, rngs=rngs)
        self.norm = LayerNorm(stride * stride * in_channels)

    def __call__(self, x):
        b, h, w, c = x.shape
        s = self.stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
            h, w = h + ph, w + pw
        x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // s, w // s, c * s * s)
        return self.reduction(self.norm(x))


class FFN(nnx.Module):
    """``layers.0.0`` Linear -> GELU -> dropout -> ``layers.1`` Linear -> dropout; identity + drop_path(out)."""

    def __init__(self, embed_dims, feedforward_channels, act_cfg=None, ffn_drop=0.0, drop_path_rate=0.0,
                 *, rngs: nnx.Rngs):
        act = dict(act_cfg or {"type": "GELU"})
        if act.get("type") != "GELU":
            raise ValueError(f"Swin FFN: unsupported act_cfg {act!r} (only GELU)")
        self.layers = Sequential(Sequential(Linear(embed_dims, feedforward_channels, rngs=rngs), gelu),
                                 Linear(feedforward_channels, embed_dims, rngs=rngs))
        self.ffn_drop, self.drop_path_rate = ffn_drop, drop_path_rate

    def __call__(self, x, identity=None, key=None):
        k1, k2, k3 = split_key(key, 3)
        out = dropout(self.layers[0](x), self.ffn_drop, k1)
        out = dropout(self.layers[1](out), self.ffn_drop, k2)
        return (x if identity is None else identity) + drop_path(out, self.drop_path_rate, k3)
