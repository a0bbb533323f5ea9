"""Greedy NMS with static shapes, equal to ``torchvision.ops.nms`` on the valid entries.

torchvision (CPU kernel ``nms_kernel.cpp``) visits boxes in descending score order and suppresses
every later box whose IoU with a kept box is **strictly greater** than the threshold; IoU is
``inter / (area_i + area_j - inter)`` with ``area = (x2 - x1) * (y2 - y1)`` (no +1), in the input
dtype. Picking, at every step, the highest-scoring box that is neither kept nor suppressed yields
exactly the same kept sequence. Ties in score go to the lower index (torchvision's CPU sort is not
stable on large inputs, so its order among exactly equal scores is undefined there).

Cost O(max_output * N) time and O(N) memory; the loop stops early once nothing is left.
Outputs are padded: ``keep_idx`` (max_output,) int32 with 0 in padded slots, ``keep_valid`` bool.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def nms(boxes, scores, valid, iou_threshold: float, max_output: int):
    boxes = jax.lax.stop_gradient(boxes)
    scores = jax.lax.stop_gradient(scores)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    neg = jnp.asarray(-jnp.inf, scores.dtype)

    def cond(state):
        i, alive, _, _ = state
        return (i < max_output) & alive.any()

    def body(state):
        i, alive, keep, kv = state
        j = jnp.argmax(jnp.where(alive, scores, neg))
        xx1 = jnp.maximum(x1[j], x1)
        yy1 = jnp.maximum(y1[j], y1)
        xx2 = jnp.minimum(x2[j], x2)
        yy2 = jnp.minimum(y2[j], y2)
        inter = jnp.maximum(xx2 - xx1, 0) * jnp.maximum(yy2 - yy1, 0)
        ovr = inter / (areas[j] + areas - inter)
        alive = alive & ~(ovr > iou_threshold)
        alive = alive.at[j].set(False)
        return i + 1, alive, keep.at[i].set(j.astype(jnp.int32)), kv.at[i].set(True)

    init = (jnp.int32(0), jnp.asarray(valid, bool), jnp.zeros(max_output, jnp.int32), jnp.zeros(max_output, bool))
    _, _, keep, kv = jax.lax.while_loop(cond, body, init)
    return keep, kv


def batched_nms(boxes, scores, idxs, valid, iou_threshold: float, max_output: int):
    """Class-aware NMS by visdet's offset trick: boxes + idx * (max coordinate + 1), the max taken over
    the valid boxes, IoU computed on the offset boxes (as visdet does, so float rounding matches).
    visdet's per-class split path (>= 10000 boxes) gives the same keeps except for its bug of falling
    back to IoU 0.5 after the first class, which we do not copy."""
    boxes = jax.lax.stop_gradient(boxes)
    max_coord = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf))
    max_coord = jnp.where(jnp.isfinite(max_coord), max_coord, 0)
    offsets = idxs.astype(boxes.dtype) * (max_coord + jnp.asarray(1, boxes.dtype))
    return nms(boxes + offsets[:, None], scores, valid, iou_threshold, max_output)
