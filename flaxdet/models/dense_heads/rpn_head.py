"""RPNHead (visdet ``models/dense_heads/rpn_head.py``): conv tower, proposal generation, and the
anchor-head losses (:class:`~flaxdet.models.dense_heads.anchor_head.AnchorHead`).

Proposal selection is static-shape: per level top-``nms_pre`` (lax.top_k; visdet sorts), decode
with clipping to the image, drop boxes with w or h <= min_bbox_size (a valid mask, not a filter),
NMS per level via level offsets (visdet's local ``batched_nms``), keep ``max_per_img`` -- padded
with a valid mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.config import RPNHeadCfg, RPNProposalCfg
from flaxdet.models.dense_heads.anchor_head import AnchorHead
from flaxdet.models.layers import ConvModule
from flaxdet.models.task_modules.coders.delta_xywh_bbox_coder import decode_deltas
from flaxdet.models.task_modules.prior_generators.anchor_generator import AnchorGenerator
from flaxdet.nn import Conv2d, Sequential, relu
from flaxdet.ops.nms import batched_nms


class RPNHead(AnchorHead):
    def __init__(self, cfg: RPNHeadCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.prior_generator = AnchorGenerator(cfg.anchor_generator)
        self.use_sigmoid_cls = bool(getattr(cfg.loss_cls, "use_sigmoid", False))
        self.cls_out_channels = cfg.num_classes if self.use_sigmoid_cls else cfg.num_classes + 1
        a = self.prior_generator.num_base_priors[0]
        if cfg.num_convs > 1:
            self.rpn_conv = Sequential(*[ConvModule(cfg.in_channels if i == 0 else cfg.feat_channels,
                                                    cfg.feat_channels, 3, padding=1, inplace=False, rngs=rngs)
                                         for i in range(cfg.num_convs)])
        else:
            self.rpn_conv = Conv2d(cfg.in_channels, cfg.feat_channels, 3, padding=1, rngs=rngs)
        self.rpn_cls = Conv2d(cfg.feat_channels, a * self.cls_out_channels, 1, rngs=rngs)
        self.rpn_reg = Conv2d(cfg.feat_channels, a * 4, 1, rngs=rngs)

    def __call__(self, feats):
        cls, reg = [], []
        for x in feats:
            t = relu(self.rpn_conv(x))
            cls.append(self.rpn_cls(t))
            reg.append(self.rpn_reg(t))
        return cls, reg

    def loss_by_feat(self, cls_scores, bbox_preds, batch, key, inject=None):
        """visdet's RPNHead naming: ``loss_rpn_cls`` / ``loss_rpn_bbox`` (per-level lists) and the targets."""
        losses, targets = super().loss_by_feat(cls_scores, bbox_preds, batch, key, inject)
        return dict(loss_rpn_cls=losses["loss_cls"], loss_rpn_bbox=losses["loss_bbox"]), targets

    def predict_by_feat(self, cls_scores, bbox_preds, img_shapes, cfg: RPNProposalCfg | None = None):
        """cls_scores/bbox_preds: per level (N, H, W, A*c) / (N, H, W, A*4); img_shapes (N, 2) [h, w].
        Returns bboxes (N, max_per_img, 4), scores (N, max_per_img), valid (N, max_per_img)."""
        cfg = cfg or self.cfg.test_cfg
        priors = self.prior_generator.grid_priors([c.shape[1:3] for c in cls_scores])
        fn = lambda c, r, s: self._predict_single(c, r, priors, s, cfg)  # noqa: E731
        return jax.vmap(fn)(list(cls_scores), list(bbox_preds), img_shapes)

    def _predict_single(self, cls_list, reg_list, priors, img_shape, cfg: RPNProposalCfg):
        scores_l, reg_l, prior_l, lvl_l = [], [], [], []
        for lvl, (cls, reg, pri) in enumerate(zip(cls_list, reg_list, priors)):
            reg = reg.reshape(-1, 4)
            if self.use_sigmoid_cls:
                scores = jax.nn.sigmoid(cls.reshape(-1))
            else:
                scores = jax.nn.softmax(cls.reshape(-1, self.cls_out_channels), -1)[:, 0]
            pri = jnp.asarray(pri)
            if 0 < cfg.nms_pre < scores.shape[0]:
                scores, idx = jax.lax.top_k(scores, cfg.nms_pre)
                reg, pri = reg[idx], pri[idx]
            scores_l.append(scores)
            reg_l.append(reg)
            prior_l.append(pri)
            lvl_l.append(jnp.full(scores.shape, lvl, jnp.int32))
        bc = self.cfg.bbox_coder
        boxes = decode_deltas(jnp.concatenate(prior_l), jnp.concatenate(reg_l), bc.target_means, bc.target_stds,
                              max_shape=img_shape, wh_ratio_clip=bc.wh_ratio_clip)
        scores = jnp.concatenate(scores_l)
        levels = jnp.concatenate(lvl_l)
        valid = jnp.ones(scores.shape, bool)
        if cfg.min_bbox_size >= 0:
            w = boxes[:, 2] - boxes[:, 0]
            h = boxes[:, 3] - boxes[:, 1]
            valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
        short = cfg.max_per_img - scores.shape[0]
        if short > 0:  # tiny inputs: fewer candidates than max_per_img
            boxes = jnp.pad(boxes, ((0, short), (0, 0)))
            scores, levels, valid = jnp.pad(scores, (0, short)), jnp.pad(levels, (0, short)), jnp.pad(valid, (0, short))
        keep, keep_valid = batched_nms(boxes, scores, levels, valid, cfg.nms.iou_threshold, cfg.max_per_img)
        out_boxes = jnp.where(keep_valid[:, None], boxes[keep], 0)
        out_scores = jnp.where(keep_valid, scores[keep], 0)
        return out_boxes, out_scores, keep_valid
