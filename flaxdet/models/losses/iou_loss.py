"""GIoULoss (visdet ``models/losses/iou_loss.py``) on aligned box pairs, pure jnp."""
from __future__ import annotations

import jax.numpy as jnp


def aligned_giou(a, b, eps=1e-6):
    """visdet ``bbox_overlaps(a, b, mode='giou', is_aligned=True, eps)``: (..., 4) x (..., 4) -> (...,); the union
    and the enclosing area are clamped to ``eps``; no +1."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0)
    overlap = wh[..., 0] * wh[..., 1]
    union = jnp.maximum(area_a + area_b - overlap, eps)
    ious = overlap / union
    ewh = jnp.clip(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0)
    enclose = jnp.maximum(ewh[..., 0] * ewh[..., 1], eps)
    return ious - (enclose - union) / enclose


def giou_loss(pred, target, eps=1e-6):
    """(...,) ``1 - GIoU(pred, target)``."""
    return 1 - aligned_giou(pred, target, eps)
