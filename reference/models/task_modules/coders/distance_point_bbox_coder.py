"""DistancePointBBoxCoder (visdet ``task_modules/coders/__init__.py``, ``structures/bbox/transforms.py:
distance2bbox``): point (x, y) and distances (left, top, right, bottom) -> (x - l, y - t, x + r, y + b),
clamped to [0, W] x [0, H] of ``max_shape`` when given and ``clip_border``."""
from __future__ import annotations

import torch

from flaxdet.config import DistancePointBBoxCoderCfg


def distance2bbox(points, distance, max_shape=None):
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    bboxes = torch.stack([x1, y1, x2, y2], -1)
    if max_shape is not None:
        if bboxes.dim() != 2:
            raise ValueError("distance2bbox with max_shape: only (N, 4) boxes are mirrored")
        bboxes[:, 0::2].clamp_(min=0, max=max_shape[1])
        bboxes[:, 1::2].clamp_(min=0, max=max_shape[0])
    return bboxes


class DistancePointBBoxCoder:
    encode_size = 4

    def __init__(self, cfg: DistancePointBBoxCoderCfg):
        self.cfg = cfg
        self.clip_border = cfg.clip_border

    def decode(self, points, pred_bboxes, max_shape=None):
        if points.size(0) != pred_bboxes.size(0) or points.size(-1) != 2 or pred_bboxes.size(-1) != 4:
            raise ValueError(f"decode: points {tuple(points.shape)} vs distances {tuple(pred_bboxes.shape)}")
        return distance2bbox(points, pred_bboxes, max_shape if self.clip_border else None)
