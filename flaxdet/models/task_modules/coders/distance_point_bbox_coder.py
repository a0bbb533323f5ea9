"""DistancePointBBoxCoder (visdet ``task_modules/coders``; ``structures/bbox/transforms.py`` distance2bbox /
bbox2distance), pure jnp.

A box is encoded as the distances (left, top, right, bottom) from a point to its sides. Decoding with
``max_shape`` (h, w) clamps x to [0, w] and y to [0, h] (visdet's ``clamp_``); ``clip_border=False`` never clamps.
"""
from __future__ import annotations

import jax.numpy as jnp


def distance2bbox(points, distance, max_shape=None):
    """points (..., 2) x, y; distance (..., 4) l, t, r, b -> boxes (..., 4) x1, y1, x2, y2.
    ``max_shape``: (h, w) scalars or arrays broadcastable to the leading dims (traced), or None."""
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    if max_shape is not None:
        dt = x1.dtype
        h, w = jnp.asarray(max_shape[0], dt), jnp.asarray(max_shape[1], dt)
        x1, x2 = jnp.clip(x1, 0, w), jnp.clip(x2, 0, w)
        y1, y2 = jnp.clip(y1, 0, h), jnp.clip(y2, 0, h)
    return jnp.stack([x1, y1, x2, y2], -1)


def bbox2distance(points, bbox, max_dis=None, eps=0.1):
    """The inverse: (l, t, r, b); ``max_dis`` clamps each to [0, max_dis - eps]."""
    d = jnp.stack([points[..., 0] - bbox[..., 0], points[..., 1] - bbox[..., 1],
                   bbox[..., 2] - points[..., 0], bbox[..., 3] - points[..., 1]], -1)
    return d if max_dis is None else jnp.clip(d, 0, max_dis - eps)


class DistancePointBBoxCoder:
    encode_size = 4

    def __init__(self, cfg):
        self.clip_border = cfg.clip_border

    def encode(self, points, gt_bboxes, max_dis=None, eps=0.1):
        return bbox2distance(points, gt_bboxes, max_dis, eps)

    def decode(self, points, pred_bboxes, max_shape=None):
        return distance2bbox(points, pred_bboxes, max_shape if self.clip_border else None)
