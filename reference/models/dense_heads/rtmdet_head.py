"""RTMDetHead and RTMDetSepBNHead (visdet ``models/dense_heads/rtmdet_head.py``), inference.

RTMDetSepBNHead, per level l (strides 8/16/32): ``cls_convs[l]`` / ``reg_convs[l]`` (``stacked_convs`` 3x3
ConvModules), 1x1 ``rtm_cls[l]`` (raw logits) and ``rtm_reg[l]``; box distances = ``rtm_reg(f) * stride``
(``exp(rtm_reg(f)) * stride`` with ``exp_on_reg``). With ``share_conv`` the ``.conv`` of levels 1, 2 *is* the
level-0 module (the state dict lists it under all three names); each level keeps its own BN.
RTMDetHead (the plain variant visdet derives from): one tower for all levels, ``Scale`` per level, always exp.
With ``with_objectness`` the logit becomes ``inverse_sigmoid(sqrt(sigmoid(cls) * sigmoid(obj)))``.
"""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import RTMDetSepBNHeadCfg
from flaxdet_reference.models.dense_heads.base_dense_head import BaseDenseHead
from flaxdet_reference.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet_reference.models.task_modules.coders.distance_point_bbox_coder import DistancePointBBoxCoder
from flaxdet_reference.models.task_modules.prior_generators.point_generator import MlvlPointGenerator


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sigmoid_geometric_mean(x, y):
    return (x.sigmoid() * y.sigmoid()).sqrt()


class Scale(nn.Module):
    """visdet ``cv/cnn/bricks/scale.py``: a learnable scalar (key ``scale``)."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x):
        return x * self.scale


class RTMDetHead(BaseDenseHead):
    def __init__(self, cfg: RTMDetSepBNHeadCfg):
        super().__init__()
        if cfg.num_classes is None:
            raise ValueError("bbox_head.num_classes is not set (visdet's RTMDet presets leave it out)")
        if cfg.anchor_generator.TYPE != "MlvlPointGenerator" or cfg.bbox_coder.TYPE != "DistancePointBBoxCoder":
            raise ValueError("RTMDet heads need MlvlPointGenerator and DistancePointBBoxCoder")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.in_channels, self.feat_channels = cfg.in_channels, cfg.feat_channels
        self.stacked_convs, self.pred_kernel_size = cfg.stacked_convs, cfg.pred_kernel_size
        self.with_objectness = cfg.with_objectness
        self.conv_cfg, self.norm_cfg, self.act_cfg = cfg.conv_cfg, cfg.norm_cfg, cfg.act_cfg
        self.train_cfg, self.test_cfg = cfg.train_cfg, cfg.test_cfg
        self.prior_generator = MlvlPointGenerator(cfg.anchor_generator)
        self.bbox_coder = DistancePointBBoxCoder(cfg.bbox_coder)
        self.use_sigmoid_cls = getattr(cfg.loss_cls, "use_sigmoid", False)
        self.cls_out_channels = cfg.num_classes if self.use_sigmoid_cls else cfg.num_classes + 1
        self.num_base_priors = self.prior_generator.num_base_priors[0]
        self._init_layers()

    def _conv(self, cin, conv=ConvModule):
        return conv(cin, self.feat_channels, 3, stride=1, padding=1, conv_cfg=self.conv_cfg,
                    norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)

    def _pred(self, cout):
        return nn.Conv2d(self.feat_channels, cout, self.pred_kernel_size, padding=self.pred_kernel_size // 2)

    def _tower(self, conv=ConvModule):
        return nn.ModuleList([self._conv(self.in_channels if i == 0 else self.feat_channels, conv)
                              for i in range(self.stacked_convs)])

    def _init_layers(self):
        self.cls_convs, self.reg_convs = self._tower(), self._tower()
        self.rtm_cls = self._pred(self.num_base_priors * self.cls_out_channels)
        self.rtm_reg = self._pred(self.num_base_priors * 4)
        if self.with_objectness:
            self.rtm_obj = self._pred(1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.prior_generator.strides])

    @staticmethod
    def _run(layers, x):
        for layer in layers:
            x = layer(x)
        return x

    def forward(self, feats):
        cls_scores, bbox_preds = [], []
        for x, scale, stride in zip(feats, self.scales, self.prior_generator.strides):
            cls_score = self.rtm_cls(self._run(self.cls_convs, x))
            reg_feat = self._run(self.reg_convs, x)
            if self.with_objectness:
                cls_score = inverse_sigmoid(sigmoid_geometric_mean(cls_score, self.rtm_obj(reg_feat)))
            cls_scores.append(cls_score)
            bbox_preds.append(scale(self.rtm_reg(reg_feat).exp()).float() * stride[0])
        return tuple(cls_scores), tuple(bbox_preds)


class RTMDetSepBNHead(RTMDetHead):
    def __init__(self, cfg: RTMDetSepBNHeadCfg):
        self.share_conv, self.use_depthwise, self.exp_on_reg = cfg.share_conv, cfg.use_depthwise, cfg.exp_on_reg
        super().__init__(cfg)

    def _init_layers(self):
        conv = DepthwiseSeparableConvModule if self.use_depthwise else ConvModule
        levels = range(len(self.prior_generator.strides))
        self.cls_convs = nn.ModuleList([self._tower(conv) for _ in levels])
        self.reg_convs = nn.ModuleList([self._tower(conv) for _ in levels])
        self.rtm_cls = nn.ModuleList([self._pred(self.num_base_priors * self.cls_out_channels) for _ in levels])
        self.rtm_reg = nn.ModuleList([self._pred(self.num_base_priors * 4) for _ in levels])
        if self.with_objectness:
            self.rtm_obj = nn.ModuleList([self._pred(1) for _ in levels])
        self._share_convs()

    def _share_convs(self):
        if self.share_conv:
            for n in range(len(self.prior_generator.strides)):
                for i in range(self.stacked_convs):
                    self.cls_convs[n][i].conv = self.cls_convs[0][i].conv
                    self.reg_convs[n][i].conv = self.reg_convs[0][i].conv

    def forward(self, feats):
        cls_scores, bbox_preds = [], []
        for idx, (x, stride) in enumerate(zip(feats, self.prior_generator.strides)):
            cls_score = self.rtm_cls[idx](self._run(self.cls_convs[idx], x))
            reg_feat = self._run(self.reg_convs[idx], x)
            if self.with_objectness:
                cls_score = inverse_sigmoid(sigmoid_geometric_mean(cls_score, self.rtm_obj[idx](reg_feat)))
            reg = self.rtm_reg[idx](reg_feat)
            cls_scores.append(cls_score)
            bbox_preds.append(reg.exp() * stride[0] if self.exp_on_reg else reg * stride[0])
        return tuple(cls_scores), tuple(bbox_preds)
