"""DynamicSoftLabelAssigner (visdet ``task_modules/assigners/dynamic_soft_label_assigner.py``; RTMDet's), one image
with static shapes: all P priors (the invalid ones masked out) against G padded GT rows (``gt_valid``).

visdet works on the subset of valid priors whose centre lies strictly inside a GT (the *candidates*); here every
array spans all priors and the non-candidates are masked, which selects the same pairs (a subset keeps the order,
so equal costs break the same way as far as ``lax.top_k`` and ``torch.topk`` agree):

1. candidate c: valid, and ``min(px - x1, py - y1, x2 - px, y2 - py) > 0`` for some valid GT;
2. GT centre: the box centre, or with masks the centre of mass of the padded mask (integer pixel indices);
3. cost (c, g) = ``soft_cls_cost + 3 * -log(iou + 1e-7) + 10 ** (|p - ctr| / stride - 3)`` over every valid GT,
   where ``soft_cls_cost = sum_k BCE(z_k, s_k) |s_k - sigmoid(z_k)|^2`` with ``s = onehot(label_g) * iou``; it is
   evaluated as the all-zero-target sum plus the label entry's correction, O(P * (C + G)) instead of O(P * G * C);
4. ``k_g = max(int(sum of the top-min(13, n) candidate IoUs of g), 1)``; g marks its k_g cheapest candidates;
5. a candidate marked by several GTs keeps only ``argmin_g cost`` (over all valid GTs);
6. positives: ``gt_inds = g + 1``, ``labels = label_g``, ``max_overlaps = iou``; the rest 0, -1, -1e8.

Shapes: priors (P, 4) (x, y, stride_w, stride_h); valid (P,); decoded (P, 4); logits (P, C); gt_bboxes (G, 4);
gt_labels, gt_valid (G,); gt_centers (G, 2) or None. Returns dict gt_inds / labels (P,) int32, max_overlaps (P,),
in_gts (P,) (the candidates), cost / ious (P, G) (non-candidate rows and invalid columns meaningless).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxdet.models.losses.gfocal_loss import bce_with_logits
from flaxdet.models.task_modules.assigners.iou2d_calculator import bbox_overlaps

INF = 100000000.0
EPS = 1e-7


def center_of_mass(masks, eps=EPS):
    """visdet ``structures/mask/utils.center_of_mass`` for (G, H, W) {0, 1} masks -> (G, 2) (x, y): integer sums of
    the row / column indices (exact), converted to float32 and divided by ``max(count, eps)``."""
    m = masks.astype(jnp.int32)
    h, w = m.shape[-2:]
    count = m.sum((-2, -1))
    sy = (m.sum(-1) * jnp.arange(h, dtype=jnp.int32)).sum(-1)
    sx = (m.sum(-2) * jnp.arange(w, dtype=jnp.int32)).sum(-1)
    norm = jnp.maximum(count.astype(jnp.float32), eps)
    return jnp.stack([sx.astype(jnp.float32) / norm, sy.astype(jnp.float32) / norm], -1)


class DynamicSoftLabelAssigner:
    def __init__(self, cfg):
        if cfg.iou_calculator is not None and dict(cfg.iou_calculator).get("type", "BboxOverlaps2D") != \
                "BboxOverlaps2D":
            raise ValueError(f"DynamicSoftLabelAssigner: iou_calculator {dict(cfg.iou_calculator)!r} is not supported")
        self.soft_center_radius = float(cfg.soft_center_radius)
        self.topk = int(cfg.topk)
        self.iou_weight = float(cfg.iou_weight)

    def assign(self, priors, valid, decoded, logits, gt_bboxes, gt_labels, gt_valid, gt_centers=None):
        p, g = priors.shape[0], gt_bboxes.shape[0]
        pts = priors[:, :2]
        deltas = jnp.concatenate([pts[:, None] - gt_bboxes[None, :, :2], gt_bboxes[None, :, 2:] - pts[:, None]], -1)
        is_in = (jnp.min(deltas, -1) > 0) & gt_valid[None]
        cand = valid & jnp.any(is_in, 1)

        if gt_centers is None:
            gt_centers = (gt_bboxes[:, :2] + gt_bboxes[:, 2:]) / 2.0
        dist = jnp.sqrt(jnp.sum(jnp.square(pts[:, None] - gt_centers[None]), -1)) / priors[:, 2:3]
        center_cost = jnp.power(jnp.float32(10.0), dist - self.soft_center_radius)

        ious = bbox_overlaps(decoded, gt_bboxes)  # (P, G)
        iou_cost = -jnp.log(ious + EPS) * self.iou_weight

        # soft classification cost: every class against 0, then the GT label's entry against the IoU
        sig = jax.nn.sigmoid(logits)
        base = jnp.sum(bce_with_logits(logits, 0.0) * jnp.square(sig), -1)  # (P,)
        z_l = jnp.take(logits, gt_labels, axis=1)  # (P, G)
        s_l = jnp.take(sig, gt_labels, axis=1)
        corr = bce_with_logits(z_l, ious) * jnp.square(ious - s_l) - bce_with_logits(z_l, 0.0) * jnp.square(s_l)
        cost = base[:, None] + corr + iou_cost + center_cost

        pair = cand[:, None] & gt_valid[None]
        k = min(self.topk, p)
        top_ious = jax.lax.top_k(jnp.where(pair, ious, 0.0).T, k)[0]  # (G, k), largest first
        dynamic_ks = jnp.maximum(jnp.sum(top_ious, -1).astype(jnp.int32), 1)  # (G,)
        kmax = min(self.topk, p)  # k_g <= sum of <= 13 IoUs <= 13
        masked = jnp.where(pair, cost, jnp.inf)
        neg_top, idx = jax.lax.top_k(-masked.T, kmax)  # (G, kmax) cheapest candidates first
        take = (jnp.arange(kmax)[None] < dynamic_ks[:, None]) & jnp.isfinite(neg_top)
        matching = jnp.zeros((g, p), bool).at[jnp.arange(g)[:, None], idx].max(take).T  # (P, G)

        multi = jnp.sum(matching, 1) > 1
        argmin = jnp.argmin(jnp.where(gt_valid[None], cost, jnp.inf), 1)
        matching = jnp.where(multi[:, None], jax.nn.one_hot(argmin, g, dtype=bool), matching)
        fg = jnp.any(matching, 1)
        matched = jnp.argmax(matching, 1)
        iou_m = jnp.take_along_axis(ious, matched[:, None], 1)[:, 0]
        return dict(gt_inds=jnp.where(fg, matched + 1, 0).astype(jnp.int32),
                    labels=jnp.where(fg, gt_labels[matched], -1).astype(jnp.int32),
                    max_overlaps=jnp.where(fg, iou_m, -INF), in_gts=cand, cost=cost, ious=ious,
                    assigned=matched.astype(jnp.int32), pos=fg)
