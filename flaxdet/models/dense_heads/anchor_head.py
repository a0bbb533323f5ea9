"""AnchorHead (visdet ``models/dense_heads/anchor_head.py``): the anchor-based training targets and losses.

Static shapes per image: A anchors of all levels (ordered level, y, x, anchor), G padded GTs (``gt_valid``).
visdet's ``loss_by_feat``: anchors inside each image's padded extent (and ``allowed_border`` of its image),
MaxIoUAssigner, RandomSampler, DeltaXYWH targets of the positives; per level a sigmoid BCE and the box loss,
each ``sum / (avg_factor + eps)`` with ``avg_factor = sum over images of max(n_pos, 1) + max(n_neg, 1)``.
Subclasses (:class:`~flaxdet.models.dense_heads.rpn_head.RPNHead`) own ``cfg`` and ``prior_generator``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet.models.losses import binary_cross_entropy, regression_loss, weight_reduce_loss
from flaxdet.models.task_modules.assigners.max_iou_assigner import max_iou_assign
from flaxdet.models.task_modules.coders.delta_xywh_bbox_coder import encode_deltas
from flaxdet.models.task_modules.samplers.random_sampler import random_sample


class AnchorHead(nnx.Module):
    def anchors_and_flags(self, featmap_sizes, pad_shape, img_shape):
        """(A, 4) anchors (static) and (A,) usable flags for one image (traced pad/img shapes): inside
        the padded extent and, with ``train_cfg.allowed_border >= 0``, within that border of the image."""
        anchors = jnp.asarray(np.concatenate(self.prior_generator.grid_priors(featmap_sizes)))
        flags = self.prior_generator.valid_flags(featmap_sizes, pad_shape)
        border = self.cfg.train_cfg.allowed_border
        if border >= 0:
            flags = flags & (anchors[:, 0] >= -border) & (anchors[:, 1] >= -border) \
                & (anchors[:, 2] < img_shape[1] + border) & (anchors[:, 3] < img_shape[0] + border)
        return anchors, flags

    def _get_targets_single(self, anchors, flags, gt_boxes, gt_valid, key, inject=None):
        cfg = self.cfg.train_cfg
        a = cfg.assigner
        assigned, _ = max_iou_assign(anchors, flags, gt_boxes, gt_valid, a.pos_iou_thr, a.neg_iou_thr,
                                     a.min_pos_iou, a.match_low_quality, a.gt_max_assign_all)
        s = cfg.sampler
        sample = random_sample(assigned, s.num, s.pos_fraction, s.neg_pos_ub, key, inject)
        n = anchors.shape[0]
        pw = 1.0 if cfg.pos_weight <= 0 else float(cfg.pos_weight)  # visdet: train_cfg.pos_weight (> 0 overrides 1)
        label_w = jnp.zeros(n).at[sample["neg_inds"]].max(sample["neg_valid"].astype(jnp.float32))
        label_w = label_w.at[sample["pos_inds"]].max(sample["pos_valid"] * pw)
        pos = jnp.zeros(n, bool).at[sample["pos_inds"]].max(sample["pos_valid"])
        coder = self.cfg.bbox_coder
        targets = encode_deltas(anchors, gt_boxes[jnp.clip(assigned - 1, 0)], coder.target_means, coder.target_stds)
        targets = jnp.where(pos[:, None], targets, 0.0)
        avg = jnp.maximum(sample["pos_valid"].sum(), 1) + jnp.maximum(sample["neg_valid"].sum(), 1)
        labels = jnp.where(pos, 0, 1)  # foreground class 0, background = num_classes (1)
        return dict(labels=labels, label_weights=label_w, bbox_targets=targets,
                    bbox_weights=jnp.broadcast_to(pos[:, None], targets.shape).astype(jnp.float32),
                    avg_factor=avg, assigned=assigned, sample=sample)

    def get_targets(self, featmap_sizes, batch, key, inject=None):
        """Targets for every image of ``batch`` (vmapped; one PRNG key per image)."""
        keys = jax.random.split(key, batch["gt_bboxes"].shape[0])

        def one(pad_shape, img_shape, gtb, gtv, k, inj):
            anchors, flags = self.anchors_and_flags(featmap_sizes, pad_shape, img_shape)
            return self._get_targets_single(anchors, flags, gtb, gtv, k, inj)

        return jax.vmap(one)(batch["pad_shapes"], batch["img_shapes"], batch["gt_bboxes"], batch["gt_valid"], keys,
                             inject)

    def loss_by_feat(self, cls_scores, bbox_preds, batch, key, inject=None):
        """Per-level losses ``dict(loss_cls=[...], loss_bbox=[...])`` (each weighted by its config's
        ``loss_weight``) and the targets. ``inject``: per-image sampler indices to replay."""
        sizes = [c.shape[1:3] for c in cls_scores]
        n = cls_scores[0].shape[0]
        t = self.get_targets(sizes, batch, key, inject)
        avg = t["avg_factor"].sum().astype(jnp.float32)
        cls = jnp.concatenate([c.reshape(n, -1) for c in cls_scores], 1)  # (N, A), order (lvl, y, x, a)
        reg = jnp.concatenate([r.reshape(n, -1, 4) for r in bbox_preds], 1)
        cls_l = binary_cross_entropy(cls, (t["labels"] == 0).astype(cls.dtype))
        reg_l = regression_loss(self.cfg.loss_bbox)(reg, t["bbox_targets"])
        bounds = np.cumsum([0] + [int(np.prod(s)) * self.prior_generator.num_base_priors[i]
                                  for i, s in enumerate(sizes)])
        wc, wb = self.cfg.loss_cls.loss_weight, self.cfg.loss_bbox.loss_weight
        levels = list(zip(bounds[:-1], bounds[1:]))
        losses = dict(
            loss_cls=[wc * weight_reduce_loss(cls_l[:, a:b], t["label_weights"][:, a:b], avg) for a, b in levels],
            loss_bbox=[wb * weight_reduce_loss(reg_l[:, a:b], t["bbox_weights"][:, a:b], avg) for a, b in levels])
        return losses, t
