"""DeltaXYWHBBoxCoder (visdet ``task_modules/coders/delta_xywh_bbox_coder.py``), pure jnp.

Arithmetic order follows visdet exactly so float32 results are bit-comparable. visdet's decode has no dw/dh
clamp; ``wh_ratio_clip`` (e.g. 16/1000) restores upstream MMDetection's clamp.
"""
from __future__ import annotations

import math

import jax.numpy as jnp


def encode_deltas(bboxes, gt_bboxes, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0)):
    px = (bboxes[..., 0] + bboxes[..., 2]) * 0.5
    py = (bboxes[..., 1] + bboxes[..., 3]) * 0.5
    pw = bboxes[..., 2] - bboxes[..., 0]
    ph = bboxes[..., 3] - bboxes[..., 1]
    gx = (gt_bboxes[..., 0] + gt_bboxes[..., 2]) * 0.5
    gy = (gt_bboxes[..., 1] + gt_bboxes[..., 3]) * 0.5
    gw = gt_bboxes[..., 2] - gt_bboxes[..., 0]
    gh = gt_bboxes[..., 3] - gt_bboxes[..., 1]
    d = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], axis=-1)
    dt = d.dtype
    return (d - jnp.asarray(means, dt)) / jnp.asarray(stds, dt)


def decode_deltas(bboxes, deltas, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0),
                  max_shape=None, wh_ratio_clip=None):
    """max_shape: (h, w) -- scalars or arrays broadcastable to the leading dims -- or None."""
    dt = deltas.dtype
    d = deltas * jnp.asarray(stds, dt) + jnp.asarray(means, dt)
    dw, dh = d[..., 2], d[..., 3]
    if wh_ratio_clip is not None:
        m = abs(math.log(wh_ratio_clip))
        dw, dh = jnp.clip(dw, -m, m), jnp.clip(dh, -m, m)
    px = (bboxes[..., 0] + bboxes[..., 2]) * 0.5
    py = (bboxes[..., 1] + bboxes[..., 3]) * 0.5
    pw = bboxes[..., 2] - bboxes[..., 0]
    ph = bboxes[..., 3] - bboxes[..., 1]
    gx = px + d[..., 0] * pw
    gy = py + d[..., 1] * ph
    gw = pw * jnp.exp(dw)
    gh = ph * jnp.exp(dh)
    x1, y1, x2, y2 = gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5
    if max_shape is not None:
        h = jnp.asarray(max_shape[0], dt)
        w = jnp.asarray(max_shape[1], dt)
        x1, x2 = jnp.clip(x1, 0, w), jnp.clip(x2, 0, w)
        y1, y2 = jnp.clip(y1, 0, h), jnp.clip(y2, 0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)
