"""Greedy NMS with static shapes, equal to ``torchvision.ops.nms`` on the valid entries.

torchvision (CPU kernel ``nms_kernel.cpp``) visits boxes in descending score order and suppresses
every later box whose IoU with a kept box is **strictly greater** than the threshold; IoU is computed
in the input dtype as ``inter / (area_i + area_j - inter)`` with ``area = (x2 - x1) * (y2 - y1)`` (no
+1) and ``inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))``; the comparison with the
(double) threshold is exact. Picking, at every step, the best-ranked box that is neither kept nor
suppressed yields exactly the same kept sequence. Ranks come from a stable descending sort, so equal
scores go to the lower index (torchvision's own order among exactly equal scores is unspecified).
Entries with ``valid`` False never take part, whatever their score (-inf and NaN included).

Cost O(max_output * N) time and O(N) memory; the loop stops early once no candidate is left. The ``nms_blocks``
fast path (:mod:`flaxdet.fast_paths.nms_blocks`; CPU by default) keeps the same boxes checking score-sorted blocks
of candidates against the boxes kept so far.
Outputs are padded: ``keep_idx`` (max_output,) int32 holding 0 in padded slots, ``keep_valid`` bool.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from flaxdet import fast_paths
from flaxdet.fast_paths.nms_blocks import nms_blocks


def _threshold(thr, dtype):
    """``ovr > thr`` with ``thr`` a double, for ``ovr`` of ``dtype``: the largest ``dtype`` value
    <= thr gives the same strict comparison (Python floats would be rounded to nearest)."""
    if not isinstance(thr, (int, float, np.floating)) or dtype not in (np.float32, np.float64):
        return thr  # traced threshold or other dtype: plain comparison in the input dtype
    t = dtype.type(thr)
    return np.nextafter(t, dtype.type(-np.inf)) if float(t) > float(thr) else t


def nms(boxes, scores, valid, iou_threshold: float, max_output: int):
    """boxes (N, 4) xyxy, scores (N,), valid (N,) bool -> (keep_idx (max_output,) int32 in
    descending score order, keep_valid (max_output,) bool)."""
    thr = _threshold(iou_threshold, np.dtype(boxes.dtype))
    boxes, scores = jax.lax.stop_gradient(boxes), jax.lax.stop_gradient(scores)
    if boxes.shape[0] and max_output and fast_paths.enabled("nms_blocks"):
        return nms_blocks(boxes, scores, valid, thr, int(max_output))
    return _nms(boxes, scores, valid, thr, int(max_output))


@partial(jax.jit, static_argnames="max_output")
def _nms(boxes, scores, valid, thr, max_output):
    n = boxes.shape[0]
    if n == 0 or max_output == 0:
        return jnp.zeros(max_output, jnp.int32), jnp.zeros(max_output, bool)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = jnp.argsort(-scores, stable=True)
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))

    def cond(state):
        i, alive, _, _ = state
        return (i < max_output) & alive.any()

    def body(state):
        i, alive, keep, kv = state
        j = jnp.argmin(jnp.where(alive, rank, n))
        w = jnp.maximum(jnp.minimum(x2[j], x2) - jnp.maximum(x1[j], x1), 0)
        h = jnp.maximum(jnp.minimum(y2[j], y2) - jnp.maximum(y1[j], y1), 0)
        inter = w * h
        ovr = inter / (areas[j] + areas - inter)
        alive = alive & ~(ovr > thr) & (jnp.arange(n) != j)
        return i + 1, alive, keep.at[i].set(j.astype(jnp.int32)), kv.at[i].set(True)

    init = (jnp.int32(0), jnp.asarray(valid, bool), jnp.zeros(max_output, jnp.int32),
            jnp.zeros(max_output, bool))
    _, _, keep, kv = jax.lax.while_loop(cond, body, init)
    return keep, kv


def batched_nms(boxes, scores, idxs, valid, iou_threshold: float, max_output: int):
    """Class-aware NMS by visdet's offset trick (``cv/ops/nms.py:batched_nms``): boxes are shifted by
    ``idx * (max coordinate + 1)``, the max taken over the valid boxes, and the IoU is computed on the
    shifted boxes, as visdet does, so float rounding matches. visdet's per-class split path (>= 10000
    boxes) keeps the same boxes, except for its bug of falling back to IoU 0.5 after the first class,
    which is not copied. Same outputs as :func:`nms`."""
    boxes = jax.lax.stop_gradient(boxes)
    if boxes.shape[0] == 0:
        return nms(boxes, scores, valid, iou_threshold, max_output)
    max_coord = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf))
    max_coord = jnp.where(jnp.isfinite(max_coord), max_coord, 0).astype(boxes.dtype)
    offsets = idxs.astype(boxes.dtype) * (max_coord + jnp.asarray(1, boxes.dtype))
    return nms(boxes + offsets[:, None], scores, valid, iou_threshold, max_output)
