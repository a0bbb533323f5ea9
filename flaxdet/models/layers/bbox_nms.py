"""multiclass_nms (visdet ``models/layers/bbox_nms.py``) with static shapes.

Candidates are every (RoI, class) pair scoring above ``score_thr`` (a valid mask, not a filter), in visdet's
order (RoI-major, then class); NMS per class (``flaxdet.ops.nms.batched_nms``), at most ``max_num`` kept,
best first, padded with a valid mask.
"""
from __future__ import annotations

import jax.numpy as jnp

from flaxdet.ops.nms import batched_nms


def multiclass_nms(multi_bboxes, multi_scores, valid, score_thr, iou_threshold, max_num):
    """multi_bboxes (P, C, 4) or (P, 4) (class-agnostic); multi_scores (P, C+1), background last; valid (P,).
    Returns bboxes (max_num, 4), scores (max_num,), labels (max_num,) int32, valid (max_num,)."""
    p, c = multi_scores.shape[0], multi_scores.shape[1] - 1
    boxes = jnp.broadcast_to(multi_bboxes.reshape(p, -1, 4), (p, c, 4)).reshape(-1, 4)
    scores = multi_scores[:, :c].reshape(-1)
    labels = jnp.tile(jnp.arange(c, dtype=jnp.int32), p)
    cand_valid = (scores > score_thr) & jnp.repeat(valid, c)
    if scores.shape[0] < max_num:  # fewer candidates than outputs: pad
        pad = max_num - scores.shape[0]
        boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
        scores, labels, cand_valid = jnp.pad(scores, (0, pad)), jnp.pad(labels, (0, pad)), jnp.pad(cand_valid, (0, pad))
    keep, kv = batched_nms(boxes, scores, labels, cand_valid, iou_threshold, max_num)
    return (jnp.where(kv[:, None], boxes[keep], 0), jnp.where(kv, scores[keep], 0), jnp.where(kv, labels[keep], 0),
            kv)
