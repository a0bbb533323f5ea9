"""BboxOverlaps2D / ``bbox_overlaps`` (visdet ``structures/bbox/bbox_overlaps.py``): modes iou and giou, pairwise
or aligned (row i with row i); areas without +1, union (and the GIoU enclosing area) clamped to ``eps``."""
from __future__ import annotations

import torch


def bbox_overlaps(bboxes1, bboxes2, mode="iou", is_aligned=False, eps=1e-6):
    """(m, 4) x (n, 4) -> (m, n) IoU/GIoU, or (m,) with ``is_aligned`` (m == n)."""
    if mode not in ("iou", "giou"):
        raise ValueError(f"bbox_overlaps: unsupported mode {mode!r} (iou, giou)")
    if bboxes1.size(0) == 0 or bboxes2.size(0) == 0:
        return bboxes1.new_zeros((bboxes1.size(0),) if is_aligned else (bboxes1.size(0), bboxes2.size(0)))
    if is_aligned and bboxes1.size(0) != bboxes2.size(0):
        raise ValueError(f"aligned bbox_overlaps of {bboxes1.size(0)} and {bboxes2.size(0)} boxes")
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    if is_aligned:
        lt = torch.max(bboxes1[..., :2], bboxes2[..., :2])
        rb = torch.min(bboxes1[..., 2:], bboxes2[..., 2:])
        wh = (rb - lt).clamp(min=0)
        overlap = wh[..., 0] * wh[..., 1]
        union = area1 + area2 - overlap
        if mode == "giou":
            enclosed_lt = torch.min(bboxes1[..., :2], bboxes2[..., :2])
            enclosed_rb = torch.max(bboxes1[..., 2:], bboxes2[..., 2:])
    else:
        lt = torch.max(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])
        rb = torch.min(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        overlap = wh[..., 0] * wh[..., 1]
        union = area1[..., None] + area2[..., None, :] - overlap
        if mode == "giou":
            enclosed_lt = torch.min(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])
            enclosed_rb = torch.max(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
    eps = union.new_tensor([eps])
    union = torch.max(union, eps)
    ious = overlap / union
    if mode == "iou":
        return ious
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], eps)
    return ious - (enclose_area - union) / enclose_area
