"""DeltaXYWHBBoxCoder -- visdet's rewrite (``task_modules/coders/__init__.py``).

visdet does **not** clamp dw/dh (upstream MMDetection clamps to +-|log(16/1000)|), has no
``add_ctr_clamp`` and clips iff ``max_shape`` is given. ``cfg.wh_ratio_clip`` (flaxdet's
option, default None) restores the upstream clamp for MMDetection-3.x users.
"""
from __future__ import annotations

import numpy as np
import torch

from flaxdet.config import DeltaXYWHBBoxCoderCfg


class DeltaXYWHBBoxCoder:
    encode_size = 4

    def __init__(self, cfg: DeltaXYWHBBoxCoderCfg):
        self.cfg = cfg
        self.means = tuple(cfg.target_means)
        self.stds = tuple(cfg.target_stds)

    def encode(self, bboxes, gt_bboxes):
        px = (bboxes[..., 0] + bboxes[..., 2]) * 0.5
        py = (bboxes[..., 1] + bboxes[..., 3]) * 0.5
        pw = bboxes[..., 2] - bboxes[..., 0]
        ph = bboxes[..., 3] - bboxes[..., 1]
        gx = (gt_bboxes[..., 0] + gt_bboxes[..., 2]) * 0.5
        gy = (gt_bboxes[..., 1] + gt_bboxes[..., 3]) * 0.5
        gw = gt_bboxes[..., 2] - gt_bboxes[..., 0]
        gh = gt_bboxes[..., 3] - gt_bboxes[..., 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], -1)
        means = deltas.new_tensor(self.means).view(1, -1)
        stds = deltas.new_tensor(self.stds).view(1, -1)
        return (deltas - means) / stds

    def decode(self, bboxes, pred_bboxes, max_shape=None):
        means = pred_bboxes.new_tensor(self.means).view(1, -1)
        stds = pred_bboxes.new_tensor(self.stds).view(1, -1)
        d = pred_bboxes * stds + means
        dw, dh = d[..., 2], d[..., 3]
        if self.cfg.wh_ratio_clip is not None:  # upstream MMDetection behaviour (opt-in)
            m = abs(float(np.log(self.cfg.wh_ratio_clip)))
            dw, dh = dw.clamp(min=-m, max=m), dh.clamp(min=-m, max=m)
        px = (bboxes[..., 0] + bboxes[..., 2]) * 0.5
        py = (bboxes[..., 1] + bboxes[..., 3]) * 0.5
        pw = bboxes[..., 2] - bboxes[..., 0]
        ph = bboxes[..., 3] - bboxes[..., 1]
        gx = px + d[..., 0] * pw
        gy = py + d[..., 1] * ph
        gw = pw * dw.exp()
        gh = ph * dh.exp()
        out = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1)
        if max_shape is not None:
            h, w = max_shape[0], max_shape[1]
            out[..., 0] = out[..., 0].clamp(min=0, max=w)
            out[..., 1] = out[..., 1].clamp(min=0, max=h)
            out[..., 2] = out[..., 2].clamp(min=0, max=w)
            out[..., 3] = out[..., 3].clamp(min=0, max=h)
        return out
