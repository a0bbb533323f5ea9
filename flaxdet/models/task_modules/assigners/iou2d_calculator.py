"""IoU of box sets (visdet ``task_modules/assigners/iou2d_calculator.py``: ``bbox_overlaps``), pure jnp."""
from __future__ import annotations

import jax.numpy as jnp


def bbox_overlaps(a, b, eps=1e-6):
    """IoU matrix (..., N, M) as visdet's ``bbox_overlaps`` (mode iou, union clamped to eps, no +1)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.clip(rb - lt, 0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - overlap
    return overlap / jnp.maximum(union, eps)
