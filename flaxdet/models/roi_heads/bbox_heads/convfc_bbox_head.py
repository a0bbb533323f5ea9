"""ConvFCBBoxHead family (visdet ``bbox_heads/convfc_bbox_head.py`` + ``bbox_head.py``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.config import ConvFCBBoxHeadCfg, CrossEntropyLossCfg, RCNNTestCfg
from flaxdet.models.layers import ConvModule
from flaxdet.models.layers.bbox_nms import multiclass_nms
from flaxdet.models.losses import accuracy, cross_entropy, regression_loss, weight_reduce_loss
from flaxdet.models.task_modules.coders.delta_xywh_bbox_coder import decode_deltas, encode_deltas
from flaxdet.nn import Linear, relu


def flatten_chw(x):
    """torch's ``x.flatten(1)`` of an NCHW tensor, from NHWC: (C, H, W) order."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class ConvFCBBoxHead(nnx.Module):
    def __init__(self, cfg: ConvFCBBoxHeadCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if not isinstance(cfg.loss_cls, CrossEntropyLossCfg) or cfg.loss_cls.use_sigmoid:
            raise ValueError("bbox head: only softmax CrossEntropyLoss classification is supported")
        self.num_classes = cfg.num_classes
        self.roi_feat_area = cfg.roi_feat_size ** 2
        self.shared_convs, self.shared_fcs, last = self._branch(cfg.num_shared_convs, cfg.num_shared_fcs,
                                                               cfg.in_channels, True, rngs)
        self.cls_convs, self.cls_fcs, cls_dim = self._branch(cfg.num_cls_convs, cfg.num_cls_fcs, last, False, rngs)
        self.reg_convs, self.reg_fcs, reg_dim = self._branch(cfg.num_reg_convs, cfg.num_reg_fcs, last, False, rngs)
        if cfg.num_shared_fcs == 0 and not cfg.with_avg_pool:
            cls_dim = cls_dim * self.roi_feat_area if cfg.num_cls_fcs == 0 else cls_dim
            reg_dim = reg_dim * self.roi_feat_area if cfg.num_reg_fcs == 0 else reg_dim
        self.fc_cls = Linear(cls_dim, cfg.num_classes + 1, rngs=rngs) if cfg.with_cls else None
        self.fc_reg = (Linear(reg_dim, 4 if cfg.reg_class_agnostic else 4 * cfg.num_classes, rngs=rngs)
                       if cfg.with_reg else None)

    def _branch(self, num_convs, num_fcs, in_channels, is_shared, rngs):
        cfg = self.cfg
        last = in_channels
        convs = [ConvModule(last if i == 0 else cfg.conv_out_channels, cfg.conv_out_channels, 3, padding=1,
                            conv_cfg=cfg.conv_cfg, norm_cfg=cfg.norm_cfg, rngs=rngs) for i in range(num_convs)]
        if num_convs:
            last = cfg.conv_out_channels
        fcs = []
        if num_fcs:
            if (is_shared or cfg.num_shared_fcs == 0) and not cfg.with_avg_pool:
                last *= self.roi_feat_area
            fcs = [Linear(last if i == 0 else cfg.fc_out_channels, cfg.fc_out_channels, rngs=rngs)
                   for i in range(num_fcs)]
            last = cfg.fc_out_channels
        return nnx.List(convs), nnx.List(fcs), last

    def _flat(self, x):
        return x.mean((1, 2)) if self.cfg.with_avg_pool else flatten_chw(x)

    def __call__(self, x):
        """x: (K, s, s, C) RoI features. Returns cls_score (K, C+1) (background last), bbox_pred."""
        for conv in self.shared_convs:
            x = conv(x)
        if len(self.shared_fcs):
            x = self._flat(x)
            for fc in self.shared_fcs:
                x = relu(fc(x))
        x_cls = x_reg = x
        for conv in self.cls_convs:
            x_cls = conv(x_cls)
        if x_cls.ndim > 2:
            x_cls = self._flat(x_cls)
        for fc in self.cls_fcs:
            x_cls = relu(fc(x_cls))
        for conv in self.reg_convs:
            x_reg = conv(x_reg)
        if x_reg.ndim > 2:
            x_reg = self._flat(x_reg)
        for fc in self.reg_fcs:
            x_reg = relu(fc(x_reg))
        cls = self.fc_cls(x_cls) if self.fc_cls is not None else None
        reg = self.fc_reg(x_reg) if self.fc_reg is not None else None
        return cls, reg

    def loss_and_target(self, cls_score, bbox_pred, rois, sample, gt_bboxes, rcnn_train_cfg):
        """visdet ``BBoxHead.loss_and_target`` on the sampled rows of a batch. ``rois`` (N*S, 5); ``sample``
        (N, S) arrays from the RoI head's sampling (``valid``, ``is_pos``, ``labels``, ``gt_idx``);
        ``gt_bboxes`` (N, G, 4). Softmax CE over the valid rows (positives weighted by ``pos_weight`` > 0)
        and the box loss on the positives' GT-class deltas, each / (#valid rows + eps); accuracy logged.
        Returns (dict(loss_cls, acc, loss_bbox), the regression targets (N*S, 4))."""
        valid = sample["valid"].reshape(-1)
        is_pos = sample["is_pos"].reshape(-1)
        labels = sample["labels"].reshape(-1)
        w = valid.astype(cls_score.dtype)
        count = w.sum()  # visdet's avg_factor: rows with label weight > 0, whatever pos_weight is
        pw = rcnn_train_cfg.pos_weight
        label_w = jnp.where(is_pos, w * pw, w) if pw > 0 else w
        loss_cls = weight_reduce_loss(cross_entropy(cls_score, labels), label_w, jnp.maximum(count, 1.0))
        bc = self.cfg.bbox_coder
        gtb = jnp.take_along_axis(gt_bboxes, sample["gt_idx"][..., None], 1).reshape(-1, 4)
        targets = encode_deltas(rois[:, 1:], gtb, bc.target_means, bc.target_stds)
        targets = jnp.where(is_pos[:, None], targets, 0.0)
        if self.cfg.reg_class_agnostic:
            pred = bbox_pred.reshape(-1, 4)
        else:
            pred = jnp.take_along_axis(bbox_pred.reshape(-1, self.num_classes, 4),
                                       jnp.clip(labels, 0, self.num_classes - 1)[:, None, None], 1)[:, 0]
        loss_bbox = weight_reduce_loss(regression_loss(self.cfg.loss_bbox)(pred, targets), is_pos[:, None], count)
        return dict(loss_cls=self.cfg.loss_cls.loss_weight * loss_cls, acc=accuracy(cls_score, labels, w),
                    loss_bbox=self.cfg.loss_bbox.loss_weight * loss_bbox), targets

    def predict_single(self, rois, valid, cls_score, bbox_pred, img_shape, scale_factor,
                       cfg: RCNNTestCfg, rescale: bool):
        """One image: rois (P, 4), valid (P,). Returns bboxes (D,4), scores (D,), labels (D,), valid (D,)
        with D = cfg.max_per_img (padded), sorted by score like visdet's multiclass_nms."""
        p, c = cls_score.shape[0], self.num_classes
        scores = jax.nn.softmax(cls_score, axis=-1)
        nc = 1 if self.cfg.reg_class_agnostic else c
        bc = self.cfg.bbox_coder
        boxes = decode_deltas(jnp.repeat(rois, nc, axis=0), bbox_pred.reshape(-1, 4), bc.target_means,
                              bc.target_stds, max_shape=img_shape, wh_ratio_clip=bc.wh_ratio_clip)
        if rescale:  # Faster R-CNN: boxes * (1 / scale) before NMS (upstream; visdet crashes here)
            inv = 1.0 / scale_factor[:2]
            boxes = boxes * jnp.concatenate([inv, inv])
        return multiclass_nms(boxes.reshape(p, nc, 4), scores, valid, cfg.score_thr, cfg.nms.iou_threshold,
                              cfg.max_per_img)


class Shared2FCBBoxHead(ConvFCBBoxHead):
    pass


class Shared4Conv1FCBBoxHead(ConvFCBBoxHead):
    pass
