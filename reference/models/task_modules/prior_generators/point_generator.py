"""MlvlPointGenerator (visdet ``task_modules/prior_generators/point_generator.py``): one prior per cell,
``((col + offset) * stride_w, (row + offset) * stride_h)`` in row-major order, optionally with the strides
appended (x, y, stride_w, stride_h)."""
from __future__ import annotations

import numpy as np
import torch

from flaxdet.config import MlvlPointGeneratorCfg


class MlvlPointGenerator:
    def __init__(self, cfg: MlvlPointGeneratorCfg):
        self.cfg = cfg
        self.strides = [(s, s) if np.isscalar(s) else tuple(s) for s in cfg.strides]
        self.offset = cfg.offset

    @property
    def num_levels(self):
        return len(self.strides)

    @property
    def num_base_priors(self):
        return [1 for _ in self.strides]

    def grid_priors(self, featmap_sizes, dtype=torch.float32, device="cpu", with_stride=False):
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"{len(featmap_sizes)} feature maps for {self.num_levels} levels")
        return [self.single_level_grid_priors(s, i, dtype, device, with_stride) for i, s in enumerate(featmap_sizes)]

    def single_level_grid_priors(self, featmap_size, level_idx, dtype=torch.float32, device="cpu",
                                 with_stride=False):
        feat_h, feat_w = featmap_size
        stride_w, stride_h = self.strides[level_idx]
        shift_x = ((torch.arange(0, feat_w, device=device) + self.offset) * stride_w).to(dtype)
        shift_y = ((torch.arange(0, feat_h, device=device) + self.offset) * stride_h).to(dtype)
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        if not with_stride:
            return torch.stack([xx, yy], dim=-1)
        return torch.stack([xx, yy, xx.new_full(xx.shape, stride_w).to(dtype),
                            xx.new_full(yy.shape, stride_h).to(dtype)], dim=-1)

    def valid_flags(self, featmap_sizes, pad_shape, device="cpu"):
        """Per level, (H*W,) bool: cell (i, j) is valid iff i < min(ceil(pad_h/s), H), j < min(ceil(pad_w/s), W)."""
        flags = []
        h, w = pad_shape[:2]
        for (feat_h, feat_w), (stride_w, stride_h) in zip(featmap_sizes, self.strides):
            valid_x = torch.zeros(feat_w, dtype=torch.bool, device=device)
            valid_y = torch.zeros(feat_h, dtype=torch.bool, device=device)
            valid_x[:min(int(np.ceil(w / stride_w)), feat_w)] = True
            valid_y[:min(int(np.ceil(h / stride_h)), feat_h)] = True
            flags.append((valid_y[:, None] & valid_x[None, :]).reshape(-1))
        return flags
