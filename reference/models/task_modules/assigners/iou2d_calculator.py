"""BboxOverlaps2D / ``bbox_overlaps`` (visdet ``structures/bbox/bbox_overlaps.py``), mode iou, not aligned:
areas without +1, union clamped to ``eps``."""
from __future__ import annotations

import torch


def bbox_overlaps(bboxes1, bboxes2, eps=1e-6):
    """(m, 4) x (n, 4) -> (m, n) IoU."""
    if bboxes1.size(0) == 0 or bboxes2.size(0) == 0:
        return bboxes1.new_zeros((bboxes1.size(0), bboxes2.size(0)))
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    lt = torch.max(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])
    rb = torch.min(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[..., None] + area2[..., None, :] - overlap
    union = torch.max(union, union.new_tensor([eps]))
    return overlap / union
