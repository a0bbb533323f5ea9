"""ResNet (visdet ``models/backbones/resnet.py``), NHWC. Same attribute tree as visdet/torchvision."""
from __future__ import annotations

import math

from flax import nnx

from flaxdet.config import ResNetCfg
from flaxdet.models.layers import norm_layer
from flaxdet.nn import BatchNorm2d, Conv2d, GroupNorm, Sequential, max_pool2d, relu


def _conv(cin, cout, k, stride=1, padding=0, dilation=1, groups=1, *, rngs):
    return Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False, rngs=rngs)


def _bn(norm_cfg, c, rngs):
    return norm_layer(norm_cfg, c, rngs)[1]


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, style="pytorch",
                 with_cp=False, norm_cfg=None, groups=1, base_width=64, base_channels=64, *, rngs):
        self.conv1 = _conv(inplanes, planes, 3, stride, dilation, dilation, rngs=rngs)
        self.bn1 = _bn(norm_cfg, planes, rngs)
        self.conv2 = _conv(planes, planes, 3, 1, 1, rngs=rngs)
        self.bn2 = _bn(norm_cfg, planes, rngs)
        self.downsample = downsample

    def __call__(self, x):
        out = relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return relu(out + identity)


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, style="pytorch",
                 with_cp=False, norm_cfg=None, groups=1, base_width=64, base_channels=64, *, rngs):
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        width = planes if groups == 1 else math.floor(planes * (base_width / base_channels)) * groups
        self.conv1 = _conv(inplanes, width, 1, conv1_stride, rngs=rngs)
        self.bn1 = _bn(norm_cfg, width, rngs)
        self.conv2 = _conv(width, width, 3, conv2_stride, dilation, dilation, groups, rngs=rngs)
        self.bn2 = _bn(norm_cfg, width, rngs)
        self.conv3 = _conv(width, planes * self.expansion, 1, rngs=rngs)
        self.bn3 = _bn(norm_cfg, planes * self.expansion, rngs)
        self.downsample = downsample

    def __call__(self, x):
        out = relu(self.bn1(self.conv1(x)))
        out = relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return relu(out + identity)


class AvgPoolCeil(nnx.Module):
    """nn.AvgPool2d(k=s, stride=s, ceil_mode=True, count_include_pad=False) for avg_down."""

    def __init__(self, stride):
        self.stride = stride

    def __call__(self, x):
        import jax
        import jax.numpy as jnp

        s = self.stride
        n, h, w, c = x.shape
        ph, pw = (-h) % s, (-w) % s
        pad = [(0, 0), (0, ph), (0, pw), (0, 0)]
        tot = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, s, s, 1), (1, s, s, 1), pad)
        cnt = jax.lax.reduce_window(jnp.ones((1, h, w, 1), x.dtype), 0.0, jax.lax.add, (1, s, s, 1),
                                    (1, s, s, 1), pad)
        return tot / cnt


def res_layer(block, inplanes, planes, num_blocks, stride, dilation, avg_down, norm_cfg, rngs, **kw):
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        layers = []
        conv_stride = stride
        if avg_down and stride != 1:
            conv_stride = 1
            layers.append(AvgPoolCeil(stride))
        layers += [_conv(inplanes, planes * block.expansion, 1, conv_stride, rngs=rngs),
                   _bn(norm_cfg, planes * block.expansion, rngs)]
        downsample = Sequential(*layers)
    blocks = [block(inplanes, planes, stride, dilation, downsample, norm_cfg=norm_cfg, rngs=rngs, **kw)]
    for _ in range(1, num_blocks):
        blocks.append(block(planes * block.expansion, planes, 1, dilation, norm_cfg=norm_cfg, rngs=rngs, **kw))
    return Sequential(*blocks)


class ResNet(nnx.Module):
    arch_settings = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                     50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                     152: (Bottleneck, (3, 8, 36, 3))}
    def __init__(self, cfg: ResNetCfg, *, rngs: nnx.Rngs):
        if cfg.depth not in self.arch_settings:
            raise ValueError(f"invalid depth {cfg.depth} for ResNet (supported: {sorted(self.arch_settings)})")
        if cfg.dcn is not None or cfg.plugins:
            raise ValueError("ResNet: dcn/plugins are not supported")
        self.cfg = cfg
        block, stage_blocks = self.arch_settings[cfg.depth]
        stem = cfg.stem_channels or cfg.base_channels
        nc = cfg.norm_cfg
        if cfg.deep_stem:
            h = stem // 2
            self.stem = Sequential(
                _conv(cfg.in_channels, h, 3, 2, 1, rngs=rngs), _bn(nc, h, rngs), relu,
                _conv(h, h, 3, 1, 1, rngs=rngs), _bn(nc, h, rngs), relu,
                _conv(h, stem, 3, 1, 1, rngs=rngs), _bn(nc, stem, rngs), relu)
        else:
            self.conv1 = _conv(cfg.in_channels, stem, 7, 2, 3, rngs=rngs)
            self.bn1 = _bn(nc, stem, rngs)
        inplanes = stem
        self.num_layers = len(stage_blocks[: cfg.num_stages])
        for i, n in enumerate(stage_blocks[: cfg.num_stages]):
            planes = cfg.base_channels * 2**i
            setattr(self, f"layer{i + 1}", res_layer(
                block, inplanes, planes, n, cfg.strides[i], cfg.dilations[i], cfg.avg_down, nc, rngs,
                style=cfg.style, groups=getattr(cfg, "groups", 1), base_width=getattr(cfg, "base_width", 64),
                base_channels=cfg.base_channels))
            inplanes = planes * block.expansion

    def __call__(self, x):
        x = self.stem(x) if self.cfg.deep_stem else relu(self.bn1(self.conv1(x)))
        x = max_pool2d(x, 3, 2, 1)
        outs = []
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.cfg.out_indices:
                outs.append(x)
        return tuple(outs)

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter path prefixes that visdet freezes, for the train step: ``frozen_stages``, and every
        norm layer when ``norm_cfg.requires_grad`` is false (visdet's caffe-style presets)."""
        k = self.cfg.frozen_stages
        out = ()
        if k >= 0:
            stem = ("stem",) if self.cfg.deep_stem else ("conv1", "bn1")
            out = stem + tuple(f"layer{i}" for i in range(1, k + 1))
        if not self.cfg.norm_cfg.requires_grad:
            out += tuple(".".join(map(str, path)) for path, node in nnx.iter_graph(self)
                         if isinstance(node, (BatchNorm2d, GroupNorm)))
        return out


class ResNeXt(ResNet):
    """visdet ``ResNeXt``: ResNet with grouped bottlenecks (``cfg.groups``, ``cfg.base_width``); same keys."""

    arch_settings = {50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                     152: (Bottleneck, (3, 8, 36, 3))}
