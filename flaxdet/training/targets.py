"""Static-shape target assignment and sampling with visdet's semantics.

Glossary (shapes per image): A = anchors of all levels, G = padded GT capacity (``gt_valid`` marks
real boxes), P = proposals, C = assignment candidates, S = sampled rows.

* :func:`max_iou_assign` -- ``MaxIoUAssigner.assign_wrt_overlaps``: -1 ignore, 0 negative, k > 0 the
  (k-1)-th GT; low-quality matches give every candidate tied at a GT's best IoU to that GT, later GTs
  overwriting earlier ones. Invalid candidates (outside the image's valid anchor region / padding)
  stay -1. An image without GTs makes every valid candidate negative.
* :func:`random_sample` -- ``RandomSampler``: up to ``int(num * pos_fraction)`` positives drawn
  uniformly without replacement, negatives fill up to ``num``; indices sorted ascending like visdet's
  ``unique()``. Random keys come from a PRNG key; ``inject`` replays recorded indices instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxdet.ops.boxes import bbox_overlaps


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


def _choose(candidates, capacity, count_limit, key):
    """Uniform random subset (<= count_limit, <= capacity) of True entries, sorted ascending.
    Returns (indices (capacity,), valid (capacity,))."""
    u = jax.random.uniform(key, candidates.shape)
    prio = jnp.where(candidates, u, -1.0)
    _, idx = jax.lax.top_k(prio, capacity)
    n = jnp.minimum(candidates.sum(), count_limit)
    valid = jnp.arange(capacity) < n
    idx = jnp.where(valid, idx, jnp.iinfo(jnp.int32).max)
    idx = jnp.sort(idx)
    return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def random_sample(assigned, num, pos_fraction, neg_pos_ub, key, inject=None):
    """Returns dict(pos_inds (Ppos,), pos_valid, neg_inds (num,), neg_valid) with Ppos = int(num*pos_fraction).

    ``inject``: dict(pos_inds, pos_valid, neg_inds, neg_valid) (padded to the same capacities) recorded
    from visdet, replacing the random draw."""
    pos_cap = int(num * pos_fraction)
    if inject is not None:
        return {k: jnp.asarray(inject[k]) for k in ("pos_inds", "pos_valid", "neg_inds", "neg_valid")}
    kp, kn = jax.random.split(key)
    pos_inds, pos_valid = _choose(assigned > 0, min(pos_cap, assigned.shape[0]), pos_cap, kp)
    n_pos = pos_valid.sum()
    n_neg = num - n_pos
    if neg_pos_ub >= 0:
        n_neg = jnp.minimum(n_neg, jnp.maximum(1, n_pos) * neg_pos_ub).astype(jnp.int32)
    neg_inds, neg_valid = _choose(assigned == 0, min(num, assigned.shape[0]), n_neg, kn)
    return dict(pos_inds=pos_inds, pos_valid=pos_valid, neg_inds=neg_inds, neg_valid=neg_valid)
