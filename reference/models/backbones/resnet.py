"""ResNet (visdet ``models/backbones/resnet.py``; same names as torchvision's ResNet)."""
from __future__ import annotations

import math

import torch.utils.checkpoint as cp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flaxdet.config import ResNetCfg
from flaxdet_reference.models.layers import norm_layer


def _conv(cin, cout, k, stride=1, padding=0, dilation=1, groups=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None,
                 style="pytorch", with_cp=False, norm_cfg=None, groups=1, base_width=64,
                 base_channels=64):
        super().__init__()
        if groups != 1:
            raise ValueError("BasicBlock does not support groups > 1")
        self.bn1 = norm_layer(norm_cfg, planes)[1]
        self.bn2 = norm_layer(norm_cfg, planes)[1]
        self.conv1 = _conv(inplanes, planes, 3, stride, dilation, dilation)
        self.conv2 = _conv(planes, planes, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.with_cp = with_cp

    def forward(self, x):
        def inner(x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return out + identity

        out = cp.checkpoint(inner, x, use_reentrant=False) if self.with_cp and x.requires_grad else inner(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None,
                 style="pytorch", with_cp=False, norm_cfg=None, groups=1, base_width=64,
                 base_channels=64):
        super().__init__()
        # pytorch style puts the stride on the 3x3 conv, caffe style on the first 1x1.
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        width = planes
        if groups > 1:  # ResNeXt: width = floor(planes * base_width / base_channels) * groups
            width = math.floor(planes * (base_width / base_channels)) * groups
        self.bn1 = norm_layer(norm_cfg, width)[1]
        self.bn2 = norm_layer(norm_cfg, width)[1]
        self.bn3 = norm_layer(norm_cfg, planes * self.expansion)[1]
        self.conv1 = _conv(inplanes, width, 1, conv1_stride)
        self.conv2 = _conv(width, width, 3, conv2_stride, dilation, dilation, groups)
        self.conv3 = _conv(width, planes * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.with_cp = with_cp

    def forward(self, x):
        def inner(x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return out + identity

        out = cp.checkpoint(inner, x, use_reentrant=False) if self.with_cp and x.requires_grad else inner(x)
        return self.relu(out)


class ResLayer(nn.Sequential):
    def __init__(self, block, inplanes, planes, num_blocks, stride=1, dilation=1, avg_down=False,
                 norm_cfg=None, **block_kwargs):
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            layers = []
            conv_stride = stride
            if avg_down and stride != 1:
                conv_stride = 1
                layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
            layers += [_conv(inplanes, planes * block.expansion, 1, conv_stride),
                       norm_layer(norm_cfg, planes * block.expansion)[1]]
            downsample = nn.Sequential(*layers)
        blocks = [block(inplanes, planes, stride, dilation, downsample, norm_cfg=norm_cfg, **block_kwargs)]
        inplanes = planes * block.expansion
        for _ in range(1, num_blocks):
            blocks.append(block(inplanes, planes, 1, dilation, norm_cfg=norm_cfg, **block_kwargs))
        super().__init__(*blocks)


class ResNet(nn.Module):
    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }
    def __init__(self, cfg: ResNetCfg):
        super().__init__()
        if cfg.depth not in self.arch_settings:
            raise ValueError(f"invalid depth {cfg.depth} for ResNet (supported: {sorted(self.arch_settings)})")
        if cfg.dcn is not None or cfg.plugins:
            raise ValueError("ResNet: dcn/plugins are not supported (visdet falls back to plain conv)")
        self.cfg = cfg
        self.depth = cfg.depth
        self.out_indices = cfg.out_indices
        self.frozen_stages = cfg.frozen_stages
        self.norm_eval = cfg.norm_eval
        self.deep_stem = cfg.deep_stem
        self.block, stage_blocks = self.arch_settings[cfg.depth]
        stage_blocks = stage_blocks[: cfg.num_stages]
        stem = cfg.stem_channels or cfg.base_channels
        norm_cfg = cfg.norm_cfg
        if cfg.deep_stem:
            h = stem // 2
            self.stem = nn.Sequential(
                _conv(cfg.in_channels, h, 3, 2, 1), norm_layer(norm_cfg, h)[1], nn.ReLU(inplace=True),
                _conv(h, h, 3, 1, 1), norm_layer(norm_cfg, h)[1], nn.ReLU(inplace=True),
                _conv(h, stem, 3, 1, 1), norm_layer(norm_cfg, stem)[1], nn.ReLU(inplace=True))
        else:
            self.conv1 = _conv(cfg.in_channels, stem, 7, 2, 3)
            self.bn1 = norm_layer(norm_cfg, stem)[1]
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        self.res_layers = []
        for i, num_blocks in enumerate(stage_blocks):
            planes = cfg.base_channels * 2**i
            layer = ResLayer(self.block, inplanes, planes, num_blocks, stride=cfg.strides[i],
                             dilation=cfg.dilations[i], avg_down=cfg.avg_down, norm_cfg=norm_cfg,
                             style=cfg.style, with_cp=cfg.with_cp, groups=getattr(cfg, "groups", 1),
                             base_width=getattr(cfg, "base_width", 64), base_channels=cfg.base_channels)
            inplanes = planes * self.block.expansion
            self.add_module(f"layer{i + 1}", layer)
            self.res_layers.append(f"layer{i + 1}")
        self._freeze_stages()

    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            stem = [self.stem] if self.deep_stem else [self.conv1, self.bn1]
            for m in stem:
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False
        for i in range(1, self.frozen_stages + 1):
            m = getattr(self, f"layer{i}")
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def forward(self, x):
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


class ResNeXt(ResNet):
    """visdet ``ResNeXt``: ResNet with grouped bottlenecks (``cfg.groups``, ``cfg.base_width``); same keys."""

    arch_settings = {50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                     152: (Bottleneck, (3, 8, 36, 3))}
