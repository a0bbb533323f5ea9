"""Transformer bricks used by the Swin backbone: visdet's ``AdaptivePadding``, ``PatchEmbed`` and
``PatchMerging`` (``visdet/models/layers/__init__.py``), ``FFN`` and ``DropPath``
(``visdet/cv/cnn/bricks/{transformer,drop}.py``). Attribute names = visdet's state_dict keys."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: keep with probability 1-p and rescale by 1/(1-p)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor()
    return x.div(keep) * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.1):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class AdaptivePadding(nn.Module):
    """Zero padding so the (kernel, stride, dilation) filter covers the whole input: "corner" pads
    bottom/right only, "same" splits the padding like TensorFlow's SAME."""

    def __init__(self, kernel_size=1, stride=1, dilation=1, padding="corner"):
        super().__init__()
        if padding not in ("same", "corner"):
            raise ValueError(f"AdaptivePadding: padding must be 'same' or 'corner', got {padding!r}")
        self.padding = padding
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)

    def get_pad_shape(self, input_shape):
        pads = []
        for size, k, s, d in zip(input_shape, self.kernel_size, self.stride, self.dilation):
            out = math.ceil(size / s)
            pads.append(max((out - 1) * s + (k - 1) * d + 1 - size, 0))
        return tuple(pads)

    def forward(self, x):
        ph, pw = self.get_pad_shape(x.shape[-2:])
        if ph > 0 or pw > 0:
            if self.padding == "corner":
                x = F.pad(x, [0, pw, 0, ph])
            else:
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return x


class PatchEmbed(nn.Module):
    """Conv patchify (key ``proj``; upstream mmdet calls it ``projection``) + optional LayerNorm.
    Returns tokens (B, Hp*Wp, C) in row-major order and (Hp, Wp)."""

    def __init__(self, in_channels=3, embed_dims=96, kernel_size=4, stride=None, padding="corner",
                 dilation=1, bias=True, norm_cfg=None):
        super().__init__()
        kernel_size = _pair(kernel_size)
        stride = kernel_size if stride is None else _pair(stride)
        dilation = _pair(dilation)
        if isinstance(padding, str):
            self.adap_padding = AdaptivePadding(kernel_size, stride, dilation, padding)
            padding = 0
        else:
            self.adap_padding = None
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size, stride, _pair(padding), dilation, bias=bias)
        # visdet builds a plain nn.LayerNorm whenever a norm_cfg is given (its eps is not read)
        self.norm = nn.LayerNorm(embed_dims) if norm_cfg is not None else None

    def forward(self, x):
        if self.adap_padding is not None:
            x = self.adap_padding(x)
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, hw


class PatchMerging(nn.Module):
    """s x s neighbourhood -> one token: zero-pad H, W (bottom/right) to multiples of s, gather the s*s
    neighbours in raster order and lay them out channel-major (channel ``c*s*s + k``, nn.Unfold's
    order), then LayerNorm(s*s*C) and ``reduction`` Linear(s*s*C, out, no bias). visdet always has the
    LayerNorm (it ignores ``norm_cfg``)."""

    def __init__(self, in_channels, out_channels, stride=2, norm_cfg=None):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.reduction = nn.Linear(stride * stride * in_channels, out_channels, bias=False)
        self.norm = nn.LayerNorm(stride * stride * in_channels)

    def forward(self, x, hw_shape):
        h, w = hw_shape
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"PatchMerging: {n} tokens for a {h}x{w} map")
        s = self.stride
        x = x.view(b, h, w, c)
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            h, w = h + ph, w + pw
        neighbours = [x[:, i::s, j::s, :] for i in range(s) for j in range(s)]
        x = torch.stack(neighbours, dim=3).transpose(3, 4).reshape(b, (h // s) * (w // s), s * s * c)
        return self.reduction(self.norm(x)), (h // s, w // s)


class FFN(nn.Module):
    """visdet FFN (num_fcs=2): ``layers.0`` = (Linear, activation, Dropout), ``layers.1`` = Linear,
    ``layers.2`` = Dropout; output = identity + dropout_layer(layers(x))."""

    def __init__(self, embed_dims, feedforward_channels, act_cfg=None, ffn_drop=0.0, drop_path_rate=0.0):
        super().__init__()
        act = dict(act_cfg or {"type": "GELU"})
        if act.get("type") != "GELU":
            raise ValueError(f"Swin FFN: unsupported act_cfg {act!r} (only GELU)")
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.GELU(), nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims), nn.Dropout(ffn_drop))
        self.dropout_layer = DropPath(drop_path_rate)

    def forward(self, x, identity=None):
        out = self.layers(x)
        return (x if identity is None else identity) + self.dropout_layer(out)
