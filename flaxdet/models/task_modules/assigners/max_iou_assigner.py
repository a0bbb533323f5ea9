"""MaxIoUAssigner (visdet ``task_modules/assigners/max_iou_assigner.py``) with static shapes.

Shapes per image: C candidates (anchors or proposals; ``cand_valid`` marks the usable ones), G padded GTs
(``gt_valid`` marks real boxes). ``assign_wrt_overlaps`` semantics: -1 ignore, 0 negative, k > 0 the
(k-1)-th GT; low-quality matches give every candidate tied at a GT's best IoU to that GT, later GTs
overwriting earlier ones. Invalid candidates (outside the image's valid anchor region / padding) stay -1.
An image without GTs makes every valid candidate negative.
"""
from __future__ import annotations

import jax.numpy as jnp

from flaxdet.models.task_modules.assigners.iou2d_calculator import bbox_overlaps


def max_iou_assign(boxes, cand_valid, gt_boxes, gt_valid, pos_iou_thr, neg_iou_thr, min_pos_iou,
                   match_low_quality=True, gt_max_assign_all=True):
    """Returns (assigned_gt_inds (C,) int32, max_overlaps (C,))."""
    ov = bbox_overlaps(gt_boxes, boxes)  # (G, C)
    ov = jnp.where(gt_valid[:, None] & cand_valid[None, :], ov, -1.0)
    any_gt = gt_valid.any()
    max_ov = ov.max(0)
    argmax = jnp.argmax(ov, 0)
    max_ov = jnp.where(any_gt, max_ov, jnp.where(cand_valid, 0.0, -1.0))
    assigned = jnp.full(boxes.shape[0], -1, jnp.int32)
    assigned = jnp.where((max_ov >= 0) & (max_ov < neg_iou_thr), 0, assigned)
    assigned = jnp.where((max_ov >= pos_iou_thr) & any_gt, argmax + 1, assigned)
    if match_low_quality:
        gt_max = ov.max(1)  # (G,)
        ok = gt_valid & (gt_max >= min_pos_iou)
        if gt_max_assign_all:
            hit = (ov == gt_max[:, None]) & ok[:, None] & cand_valid[None, :]
        else:
            hit = (jnp.arange(ov.shape[1])[None, :] == jnp.argmax(ov, 1)[:, None]) & ok[:, None]
        g = ov.shape[0]
        last = g - 1 - jnp.argmax(hit[::-1], 0)  # later GTs overwrite earlier ones
        assigned = jnp.where(hit.any(0), last + 1, assigned)
    return assigned, jnp.where(cand_valid, max_ov, 0.0)
