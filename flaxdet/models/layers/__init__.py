"""ConvModule and norm layers, mirroring visdet's ``visdet.cv.cnn`` bricks (keys ``conv``, ``bn``/``gn``)."""
from __future__ import annotations

import jax
from flax import nnx

from flaxdet.config import NormCfg
from flaxdet.nn import BatchNorm2d, Conv2d, GroupNorm, relu

ACTIVATIONS = {"ReLU": relu, "SiLU": jax.nn.silu, "Swish": jax.nn.silu}  # mmcv's Swish is x * sigmoid(x) too


def norm_layer(norm_cfg, num_features, rngs):
    d = dict(norm_cfg) if not isinstance(norm_cfg, NormCfg) else {}
    num_groups = d.pop("num_groups", 32)  # GN's own field
    cfg = norm_cfg if isinstance(norm_cfg, NormCfg) else NormCfg(**d)
    if cfg.type in ("BN", "BN2d", "SyncBN"):
        return "bn", BatchNorm2d(num_features, eps=cfg.eps, momentum=cfg.momentum, rngs=rngs)
    if cfg.type == "GN":
        return "gn", GroupNorm(num_groups, num_features, eps=cfg.eps, rngs=rngs)
    raise ValueError(f"unsupported norm type {cfg.type!r} (supported: BN, SyncBN, GN)")


class ConvModule(nnx.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias="auto", conv_cfg=None, norm_cfg=None, act_cfg=(("type", "ReLU"),), inplace=True,
                 *, rngs: nnx.Rngs):
        act = dict(act_cfg) if act_cfg is not None else None
        if act is not None and act.get("type") not in ACTIVATIONS:
            raise ValueError(f"unsupported act_cfg {act!r} (supported: {', '.join(ACTIVATIONS)})")
        self.with_activation = act is not None
        self.act_type = act["type"] if act is not None else None
        self.norm_name = None
        if bias == "auto":
            bias = norm_cfg is None
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           bias=bias, rngs=rngs)
        if norm_cfg is not None:
            self.norm_name, norm = norm_layer(norm_cfg, out_channels, rngs)
            setattr(self, self.norm_name, norm)

    def __call__(self, x):
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return ACTIVATIONS[self.act_type](x) if self.with_activation else x


class DepthwiseSeparableConvModule(nnx.Module):
    """visdet ``cv/cnn/bricks/depthwise_separable_conv_module.py``: a depthwise ConvModule (groups = in
    channels, same kernel/stride/padding) then a pointwise 1x1 ConvModule. Children ``depthwise`` /
    ``pointwise`` (visdet's spelling; upstream mmcv's is ``depthwise_conv`` / ``pointwise_conv``)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias="auto",
                 conv_cfg=None, norm_cfg=None, act_cfg=(("type", "ReLU"),), dw_norm_cfg=None, pw_norm_cfg=None,
                 dw_act_cfg=None, pw_act_cfg=None, *, rngs: nnx.Rngs):
        # visdet: a dw_/pw_ cfg left None takes the shared norm_cfg / act_cfg
        dw_norm_cfg, pw_norm_cfg = (norm_cfg if c is None else c for c in (dw_norm_cfg, pw_norm_cfg))
        dw_act_cfg, pw_act_cfg = (act_cfg if c is None else c for c in (dw_act_cfg, pw_act_cfg))
        self.depthwise = ConvModule(in_channels, in_channels, kernel_size, stride, padding, dilation,
                                    groups=in_channels, bias=bias, conv_cfg=conv_cfg, norm_cfg=dw_norm_cfg,
                                    act_cfg=dw_act_cfg, rngs=rngs)
        self.pointwise = ConvModule(in_channels, out_channels, 1, bias=bias, conv_cfg=conv_cfg, norm_cfg=pw_norm_cfg,
                                    act_cfg=pw_act_cfg, rngs=rngs)

    def __call__(self, x):
        return self.pointwise(self.depthwise(x))
