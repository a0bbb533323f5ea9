"""Building blocks shared by the reference modules (visdet ``visdet.cv.cnn`` bricks)."""
from __future__ import annotations

from torch import nn

from flaxdet.config import NormCfg


def norm_layer(norm_cfg, num_features: int) -> tuple[str, nn.Module]:
    """visdet ``build_norm_layer``: returns (attribute name, module); BN eps defaults 1e-5."""
    cfg = norm_cfg if isinstance(norm_cfg, NormCfg) else NormCfg(**dict(norm_cfg))
    if cfg.type in ("BN", "BN2d", "SyncBN"):
        layer = nn.BatchNorm2d(num_features, eps=cfg.eps, momentum=cfg.momentum)
        name = "bn"
    elif cfg.type == "GN":
        groups = dict(norm_cfg).get("num_groups", 32)
        layer, name = nn.GroupNorm(groups, num_features, eps=cfg.eps), "gn"
    else:
        raise ValueError(f"unsupported norm type {cfg.type!r} (supported: BN, SyncBN, GN)")
    for p in layer.parameters():
        p.requires_grad = cfg.requires_grad
    return name, layer


class ConvModule(nn.Module):
    """conv -> optional norm -> optional ReLU; keys ``conv.*`` and ``bn.*``/``gn.*``.

    ``act_cfg`` follows visdet: a ``{'type': 'ReLU'}`` mapping by default, ``None`` for none.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias="auto", conv_cfg=None, norm_cfg=None,
                 act_cfg=(("type", "ReLU"),), inplace=True):
        super().__init__()
        if conv_cfg is not None and dict(conv_cfg).get("type", "Conv2d") not in ("Conv", "Conv2d"):
            raise ValueError(f"unsupported conv_cfg {dict(conv_cfg)!r}")
        self.with_norm = norm_cfg is not None
        act = dict(act_cfg) if act_cfg is not None else None
        if act is not None and act.get("type") not in ("ReLU", "SiLU", "Swish"):
            raise ValueError(f"unsupported act_cfg {act!r} (supported: ReLU, SiLU, Swish)")
        self.with_activation = act is not None
        if bias == "auto":
            bias = not self.with_norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, groups, bias=bias)
        if self.with_norm:
            self.norm_name, norm = norm_layer(norm_cfg, out_channels)
            self.add_module(self.norm_name, norm)
        if self.with_activation:
            self.activate = nn.ReLU(inplace=inplace) if act["type"] == "ReLU" else nn.SiLU(inplace=inplace)

    def forward(self, x):
        x = self.conv(x)
        if self.with_norm:
            x = getattr(self, self.norm_name)(x)
        if self.with_activation:
            x = self.activate(x)
        return x


class DepthwiseSeparableConvModule(nn.Module):
    """visdet ``cv/cnn/bricks/depthwise_separable_conv_module.py``: a depthwise ConvModule (``groups`` = in
    channels) then a 1x1 pointwise ConvModule. Parts are named ``depthwise`` / ``pointwise`` (visdet's spelling;
    upstream mmcv 2.x says ``depthwise_conv`` / ``pointwise_conv``). ``dw_*`` / ``pw_*`` default to the shared
    ``norm_cfg`` / ``act_cfg``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias="auto",
                 conv_cfg=None, norm_cfg=None, act_cfg=(("type", "ReLU"),), dw_norm_cfg=None, pw_norm_cfg=None,
                 dw_act_cfg=None, pw_act_cfg=None, **kwargs):
        super().__init__()
        self.depthwise = ConvModule(in_channels, in_channels, kernel_size, stride, padding, dilation,
                                    groups=in_channels, bias=bias, conv_cfg=conv_cfg,
                                    norm_cfg=dw_norm_cfg if dw_norm_cfg is not None else norm_cfg,
                                    act_cfg=dw_act_cfg if dw_act_cfg is not None else act_cfg, **kwargs)
        self.pointwise = ConvModule(in_channels, out_channels, 1, bias=bias, conv_cfg=conv_cfg,
                                    norm_cfg=pw_norm_cfg if pw_norm_cfg is not None else norm_cfg,
                                    act_cfg=pw_act_cfg if pw_act_cfg is not None else act_cfg, **kwargs)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))
