"""RTMDetHead / RTMDetSepBNHead (visdet ``models/dense_heads/rtmdet_head.py``): the towers, the predictors,
:meth:`predict` (post-processing in :class:`~flaxdet.models.dense_heads.base_dense_head.BaseDenseHead`) and the
training losses :meth:`loss_by_feat` (visdet-rtmdet.md section 4).

Shapes (NHWC; level l = 0, 1, 2 with stride s_l = 8, 16, 32 and H_l, W_l = Hp / s_l, Wp / s_l; F = feat_channels;
C = num_classes, sigmoid classification, no background channel):
  feats[l]        (N, H_l, W_l, in_channels)  the neck's P3-P5
  cls_scores[l]   (N, H_l, W_l, C)            raw logits
  bbox_preds[l]   (N, H_l, W_l, 4)            distances (left, top, right, bottom) in input pixels
  dets            bboxes (N, D, 4), scores (N, D), labels (N, D) int32, valid (N, D); D = test_cfg.max_per_img
Training (P = sum_l H_l W_l priors, G = the batch's padded GT rows):
  priors (P, 4) (x, y, stride, stride); valid (N, P) from each image's own pad_shape; decoded (N, P, 4) unclipped
  targets labels (N, P) (C = background), label_weights (N, P) (= valid), bbox_targets (N, P, 4),
  assign_metrics (N, P) (the IoU of a positive's detached prediction with its GT, else 0)

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
import numpy as np
from flax import nnx

from flaxdet.fast_paths.image_loop import per_image
from flaxdet.models.dense_heads.base_dense_head import BaseDenseHead
from flaxdet.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet.models.losses import EPS, giou_loss, quality_focal_loss
from flaxdet.models.task_modules.assigners.dynamic_soft_label_assigner import DynamicSoftLabelAssigner
from flaxdet.models.task_modules.coders.distance_point_bbox_coder import DistancePointBBoxCoder, distance2bbox
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

    def _check_trainable(self):
        c = self.cfg
        for name, want in (("loss_cls", "QualityFocalLoss"), ("loss_bbox", "GIoULoss")):
            if getattr(c, name).TYPE != want:
                raise ValueError(f"{c.TYPE}: {name} {getattr(c, name).TYPE} is not supported in training ({want})")
        if c.loss_cls.TYPE == "QualityFocalLoss" and (not c.loss_cls.use_sigmoid or c.loss_cls.activated):
            raise ValueError(f"{c.TYPE}: QualityFocalLoss needs use_sigmoid=True and activated=False (as visdet)")
        if c.train_cfg is None:
            raise ValueError(f"{c.TYPE}: training needs a train_cfg (assigner)")
        if c.train_cfg.assigner.TYPE != "DynamicSoftLabelAssigner":
            raise ValueError(f"{c.TYPE}: assigner {c.train_cfg.assigner.TYPE} is not supported in training")
        if c.train_cfg.allowed_border != -1:
            raise ValueError(f"{c.TYPE}: train_cfg.allowed_border {c.train_cfg.allowed_border} is not supported (-1)")

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
        cls_scores, bbox_preds = per_image(self, feats)
        stages = {f"cls_scores.{lvl}": c for lvl, c in enumerate(cls_scores)}
        stages.update({f"bbox_preds.{lvl}": r for lvl, r in enumerate(bbox_preds)})
        dets, s = self.predict_by_feat(cls_scores, bbox_preds, img_shapes, scale_factors, rescale)
        stages.update(s)
        stages.update({f"det.{k}": dets.pop(k) for k in ("keep", "priors")})
        return dets, stages


    # ------------------------------------------------------------------------------------------------ training
    def flat_priors(self, sizes):
        """(P, 4) numpy priors (x, y, stride_w, stride_h), levels concatenated, and the level boundaries."""
        pri = self.prior_generator.grid_priors(sizes, with_stride=True)
        return jnp.asarray(np.concatenate(pri)), np.cumsum([0] + [len(q) for q in pri])

    def get_targets(self, flat_cls, decoded, priors, valid, batch, gt_centers=None):
        """visdet ``get_targets`` for the batch (predictions detached): per image the assigner over its valid
        priors, then labels / label_weights / bbox_targets / assign_metrics over all priors (module doc)."""
        assigner = DynamicSoftLabelAssigner(self.cfg.train_cfg.assigner)
        sg = jax.lax.stop_gradient
        gt_b, gt_l, gt_v = batch["gt_bboxes"], batch["gt_labels"], batch["gt_valid"]

        def one(logits, dec, val, b, lab, v, ctr):
            return assigner.assign(priors, val, dec, logits, b, lab, v, ctr)

        if gt_centers is None:
            a = jax.vmap(lambda *x: one(*x, None))(sg(flat_cls), sg(decoded), valid, gt_b, gt_l, gt_v)
        else:
            a = jax.vmap(one)(sg(flat_cls), sg(decoded), valid, gt_b, gt_l, gt_v, gt_centers)
        pos = a["pos"]
        labels = jnp.where(pos, a["labels"], self.cfg.num_classes)
        bbox_targets = jnp.where(pos[..., None], jnp.take_along_axis(gt_b, a["assigned"][..., None], 1), 0.0)
        metrics = jnp.where(pos, a["max_overlaps"], 0.0)
        return dict(labels=labels, label_weights=valid.astype(jnp.float32), bbox_targets=bbox_targets,
                    assign_metrics=metrics, pos=pos, assign=a)

    def loss_by_feat(self, cls_scores, bbox_preds, batch, gt_centers=None):
        """visdet ``loss_by_feat``: per level ``loss_cls`` (QualityFocalLoss against the IoU targets) and
        ``loss_bbox`` (GIoU of the positives weighted by their IoU target), each ``sum / (1 + eps)`` and divided by
        ``A = max(sum of the batch's assign_metrics, 1)`` (visdet's ``reduce_mean`` over processes: here the sum
        runs over the whole global batch, which equals it -- see docs/training.md). Returns (losses with per-level
        lists ``loss_cls`` / ``loss_bbox``, targets and intermediates)."""
        self._check_trainable()
        n = cls_scores[0].shape[0]
        sizes = [c.shape[1:3] for c in cls_scores]
        priors, bounds = self.flat_priors(sizes)
        valid = jax.vmap(lambda ps: self.prior_generator.valid_flags(sizes, ps))(batch["pad_shapes"])
        flat_cls = jnp.concatenate([c.reshape(n, -1, self.cls_out_channels) for c in cls_scores], 1)
        flat_reg = jnp.concatenate([r.reshape(n, -1, 4) for r in bbox_preds], 1)
        decoded = distance2bbox(priors[None, :, :2], flat_reg)  # (N, P, 4), no clamping
        t = self.get_targets(flat_cls, decoded, priors, valid, batch, gt_centers)
        pos = t["pos"]
        c = self.cfg
        # only the positives' boxes enter the GIoU: the others are swapped for a harmless box before the maths, so
        # an overflowing prediction elsewhere cannot turn the gradient into NaN
        unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], decoded.dtype)
        giou = giou_loss(jnp.where(pos[..., None], decoded, unit), jnp.where(pos[..., None], t["bbox_targets"], unit),
                         c.loss_bbox.eps)
        qfl = quality_focal_loss(flat_cls, t["labels"], t["assign_metrics"], c.loss_cls.beta) * t["label_weights"]
        box = jnp.where(pos, giou * t["assign_metrics"], 0.0)
        raw_cls, raw_bbox, parts = [], [], []
        for lvl in range(len(sizes)):
            sl = slice(int(bounds[lvl]), int(bounds[lvl + 1]))
            raw_cls.append(c.loss_cls.loss_weight * (jnp.sum(qfl[:, sl]) / (1.0 + EPS)))
            raw_bbox.append(c.loss_bbox.loss_weight * (jnp.sum(box[:, sl]) / (1.0 + EPS)))
            parts.append(jnp.sum(t["assign_metrics"][:, sl]))
        avg = jnp.maximum(sum(parts), 1.0)
        losses = dict(loss_cls=[x / avg for x in raw_cls], loss_bbox=[x / avg for x in raw_bbox])
        extra = dict(t, priors=priors, valid=valid, decoded=decoded, bounds=bounds, raw_cls=raw_cls,
                     raw_bbox=raw_bbox, avg_parts=parts, avg_factor=avg)
        return losses, extra

    def loss(self, feats, batch, mask_rows=None):
        """Head forward + :meth:`loss_by_feat`: (losses, extras)."""
        cls_scores, bbox_preds = self(feats)
        losses, extra = self.loss_by_feat(cls_scores, bbox_preds, batch)
        return losses, dict(extra, cls_scores=cls_scores, bbox_preds=bbox_preds)

    def mask_row_buckets(self):
        return None


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
