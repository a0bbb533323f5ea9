"""RTMDetHead / RTMDetSepBNHead (visdet ``models/dense_heads/rtmdet_head.py``), inference: the towers, the
predictors and :meth:`predict` (post-processing in :class:`~flaxdet.models.dense_heads.base_dense_head.BaseDenseHead`).

Shapes (NHWC; level l = 0, 1, 2 with stride s_l = 8, 16, 32 and H_l, W_l = Hp / s_l, Wp / s_l; F = feat_channels;
C = num_classes, sigmoid classification, no background channel):
  feats[l]        (N, H_l, W_l, in_channels)  the neck's P3-P5
  cls_scores[l]   (N, H_l, W_l, C)            raw logits
  bbox_preds[l]   (N, H_l, W_l, 4)            distances (left, top, right, bottom) in input pixels
  dets            bboxes (N, D, 4), scores (N, D), labels (N, D) int32, valid (N, D); D = test_cfg.max_per_img

RTMDetSepBNHead (the presets' head): per level ``cls_convs[l]`` / ``reg_convs[l]`` (``stacked_convs`` 3x3
ConvModules) and 1x1 ``rtm_cls[l]`` / ``rtm_reg[l]``; ``reg = exp(rtm_reg(f)) * s`` with ``exp_on_reg``, else
``rtm_reg(f) * s``. With ``share_conv`` the ``.conv`` of every level's tower convs IS level 0's module (NNX shared
reference; each level keeps its own BN), so ``bbox_head.cls_convs.{1,2}.{i}.conv.weight`` name level 0's kernel.
RTMDetHead (visdet's base class): one tower and one predictor pair for all levels, a learnable ``Scale`` per
level, ``reg = scale(exp(rtm_reg(f))) * s``. Both: ``with_objectness`` folds ``rtm_obj(reg_feat)`` into the class
logits as ``inverse_sigmoid(sqrt(sigmoid(cls) * sigmoid(obj)))``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.models.dense_heads.base_dense_head import BaseDenseHead
from flaxdet.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet.models.task_modules.coders.distance_point_bbox_coder import DistancePointBBoxCoder
from flaxdet.models.task_modules.prior_generators.point_generator import MlvlPointGenerator
from flaxdet.nn import Conv2d


def inverse_sigmoid(x, eps=1e-5):
    x = jnp.clip(x, 0, 1)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


def sigmoid_geometric_mean(x, y):
    return jnp.sqrt(jax.nn.sigmoid(x) * jax.nn.sigmoid(y))


class Scale(nnx.Module):
    """visdet ``cv/cnn/bricks/scale.py``: x * a learnable scalar (key ``scale``, shape ())."""

    TORCH_LAYOUT: dict = {}

    def __init__(self, scale=1.0):
        self.scale = nnx.Param(jnp.asarray(scale, jnp.float32))

    def __call__(self, x):
        return x * self.scale[...]


class RTMDetHead(BaseDenseHead):
    """visdet's RTMDetHead; subclasses with ``sep_bn`` hold per-level towers and predictors."""

    sep_bn = False

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        if cfg.num_classes is None:
            raise ValueError(f"{cfg.TYPE}: num_classes is not set (visdet's presets leave it out: take it from the "
                             "checkpoint's rtm_cls or give it)")
        if cfg.conv_cfg is not None:
            raise ValueError(f"{cfg.TYPE}: conv_cfg {dict(cfg.conv_cfg)!r} is not supported (plain Conv2d only)")
        self.cfg = cfg
        self.prior_generator = MlvlPointGenerator(cfg.anchor_generator)
        self.bbox_coder = DistancePointBBoxCoder(cfg.bbox_coder)
        self.use_sigmoid_cls = bool(getattr(cfg.loss_cls, "use_sigmoid", True))
        self.cls_out_channels = cfg.num_classes if self.use_sigmoid_cls else cfg.num_classes + 1
        self.strides = [s[0] for s in self.prior_generator.strides]
        self.with_objectness = cfg.with_objectness
        self._init_layers(rngs)

    # -------------------------------------------------------------------------------------------------- layers
    def _tower(self, rngs, conv=ConvModule):
        c = self.cfg
        return nnx.List([conv(c.in_channels if i == 0 else c.feat_channels, c.feat_channels, 3, stride=1, padding=1,
                              norm_cfg=c.norm_cfg, act_cfg=c.act_cfg, rngs=rngs) for i in range(c.stacked_convs)])

    def _predictor(self, out_channels, rngs):
        k = self.cfg.pred_kernel_size
        return Conv2d(self.cfg.feat_channels, out_channels, k, padding=k // 2, rngs=rngs)

    def _init_layers(self, rngs):
        self.cls_convs, self.reg_convs = self._tower(rngs), self._tower(rngs)
        self.rtm_cls = self._predictor(self.cls_out_channels, rngs)
        self.rtm_reg = self._predictor(4, rngs)
        if self.with_objectness:
            self.rtm_obj = self._predictor(1, rngs)
        self.scales = nnx.List([Scale(1.0) for _ in self.strides])

    def _share_convs(self, *towers):
        """visdet's ``share_conv``: ``towers[t][l][i].conv = towers[t][0][i].conv`` for every level l."""
        for tower in towers:
            for level in tower:
                for i, layer in enumerate(level):
                    layer.conv = tower[0][i].conv

    # ------------------------------------------------------------------------------------------------- forward
    def level_module(self, name, lvl):
        """The module (tower or predictor) ``name`` used at level ``lvl``."""
        m = getattr(self, name)
        return m[lvl] if self.sep_bn else m

    def _tower_out(self, name, x, lvl):
        for layer in self.level_module(name, lvl):
            x = layer(x)
        return x

    def reg_distances(self, raw, lvl):
        """rtm_reg's output -> distances in input pixels."""
        return self.scales[lvl](jnp.exp(raw)) * self.strides[lvl]

    def forward_single(self, x, lvl):
        """(cls_score, bbox_pred, reg_feat) of one level."""
        cls_score = self.level_module("rtm_cls", lvl)(self._tower_out("cls_convs", x, lvl))
        reg_feat = self._tower_out("reg_convs", x, lvl)
        if self.with_objectness:
            obj = self.level_module("rtm_obj", lvl)(reg_feat)
            cls_score = inverse_sigmoid(sigmoid_geometric_mean(cls_score, obj))
        return cls_score, self.reg_distances(self.level_module("rtm_reg", lvl)(reg_feat), lvl)

    def __call__(self, feats):
        """feats: per level (N, H, W, in_channels) -> (cls_scores, bbox_preds), per level."""
        outs = [self.forward_single(x, lvl) for lvl, x in enumerate(feats)]
        return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

    def predict(self, feats, img_shapes, scale_factors, canvas_hw=None, rescale=True):
        """Head + post-processing: (dets, stages). ``canvas_hw`` is unused (no masks)."""
        cls_scores, bbox_preds = self(feats)
        stages = {f"cls_scores.{lvl}": c for lvl, c in enumerate(cls_scores)}
        stages.update({f"bbox_preds.{lvl}": r for lvl, r in enumerate(bbox_preds)})
        dets, s = self.predict_by_feat(cls_scores, bbox_preds, img_shapes, scale_factors, rescale)
        stages.update(s)
        stages.update({f"det.{k}": dets.pop(k) for k in ("keep", "priors")})
        return dets, stages


class RTMDetSepBNHead(RTMDetHead):
    """RTMDetHead with per-level towers (separate BN, convs shared across levels with ``share_conv``) and
    per-level predictors; no Scale. ``use_depthwise``: depthwise-separable tower convs (visdet raises with
    ``share_conv``: a DepthwiseSeparableConvModule has no ``.conv`` to share; so does flaxdet)."""

    sep_bn = True

    def _init_layers(self, rngs):
        c = self.cfg
        if c.use_depthwise and c.share_conv:
            raise ValueError(f"{c.TYPE}: use_depthwise with share_conv fails in visdet (no .conv to share)")
        conv = DepthwiseSeparableConvModule if c.use_depthwise else ConvModule
        levels = range(len(self.strides))
        self.cls_convs = nnx.List([self._tower(rngs, conv) for _ in levels])
        self.reg_convs = nnx.List([self._tower(rngs, conv) for _ in levels])
        self.rtm_cls = nnx.List([self._predictor(self.cls_out_channels, rngs) for _ in levels])
        self.rtm_reg = nnx.List([self._predictor(4, rngs) for _ in levels])
        if self.with_objectness:
            self.rtm_obj = nnx.List([self._predictor(1, rngs) for _ in levels])
        if c.share_conv:
            self._share_convs(self.cls_convs, self.reg_convs)

    def reg_distances(self, raw, lvl):
        return (jnp.exp(raw) if self.cfg.exp_on_reg else raw) * self.strides[lvl]
