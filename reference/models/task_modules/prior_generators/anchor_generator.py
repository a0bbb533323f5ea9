"""AnchorGenerator (visdet ``task_modules/prior_generators/anchor_generator.py``), v2.0 style:
base anchors centred at ``center_offset * base_size`` (0), not rounded; grid order (y, x, anchor)."""
from __future__ import annotations

import numpy as np
import torch

from flaxdet.config import AnchorGeneratorCfg


class AnchorGenerator:
    def __init__(self, cfg: AnchorGeneratorCfg):
        self.cfg = cfg
        self.strides = [(s, s) if np.isscalar(s) else tuple(s) for s in cfg.strides]
        self.base_sizes = list(cfg.base_sizes) if cfg.base_sizes is not None else [min(s) for s in self.strides]
        if cfg.scales is not None:
            self.scales = torch.Tensor(cfg.scales)
        elif cfg.octave_base_scale is not None and cfg.scales_per_octave is not None:
            octave = np.array([2 ** (i / cfg.scales_per_octave) for i in range(cfg.scales_per_octave)])
            self.scales = torch.Tensor(octave * cfg.octave_base_scale)
        else:
            raise ValueError("AnchorGenerator needs scales or octave_base_scale + scales_per_octave")
        self.ratios = torch.Tensor(cfg.ratios)
        self.scale_major = cfg.scale_major
        self.center_offset = cfg.center_offset
        self.centers = cfg.centers
        self.base_anchors = [self._base_anchors(b, i) for i, b in enumerate(self.base_sizes)]

    @property
    def num_levels(self):
        return len(self.strides)

    @property
    def num_base_priors(self):
        return [b.size(0) for b in self.base_anchors]

    def _base_anchors(self, base_size, level):
        w = h = base_size
        if self.centers is None:
            xc, yc = self.center_offset * w, self.center_offset * h
        else:
            xc, yc = self.centers[level]
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        if self.scale_major:
            ws = (w * w_ratios[:, None] * self.scales[None, :]).view(-1)
            hs = (h * h_ratios[:, None] * self.scales[None, :]).view(-1)
        else:
            ws = (w * self.scales[:, None] * w_ratios[None, :]).view(-1)
            hs = (h * self.scales[:, None] * h_ratios[None, :]).view(-1)
        return torch.stack([xc - 0.5 * ws, yc - 0.5 * hs, xc + 0.5 * ws, yc + 0.5 * hs], dim=-1)

    def single_level_grid_priors(self, featmap_size, level_idx, dtype=torch.float32, device="cpu"):
        base = self.base_anchors[level_idx].to(device).to(dtype)
        feat_h, feat_w = featmap_size
        stride_w, stride_h = self.strides[level_idx]
        shift_x = torch.arange(0, feat_w, device=device).to(dtype) * stride_w
        shift_y = torch.arange(0, feat_h, device=device).to(dtype) * stride_h
        xx = shift_x.repeat(shift_y.shape[0])
        yy = shift_y.view(-1, 1).repeat(1, shift_x.shape[0]).view(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base[None, :, :] + shifts[:, None, :]).view(-1, 4)

    def grid_priors(self, featmap_sizes, dtype=torch.float32, device="cpu"):
        return [self.single_level_grid_priors(s, i, dtype, device) for i, s in enumerate(featmap_sizes)]

    def single_level_valid_flags(self, featmap_size, valid_size, num_base_anchors, device="cpu"):
        feat_h, feat_w = featmap_size
        valid_h, valid_w = valid_size
        valid_x = torch.zeros(feat_w, dtype=torch.bool, device=device)
        valid_y = torch.zeros(feat_h, dtype=torch.bool, device=device)
        valid_x[:valid_w] = 1
        valid_y[:valid_h] = 1
        vx = valid_x.repeat(valid_y.shape[0])
        vy = valid_y.view(-1, 1).repeat(1, valid_x.shape[0]).view(-1)
        valid = vx & vy
        return valid[:, None].expand(valid.size(0), num_base_anchors).contiguous().view(-1)

    def valid_flags(self, featmap_sizes, pad_shape, device="cpu"):
        flags = []
        for i, (fh, fw) in enumerate(featmap_sizes):
            sw, sh = self.strides[i]
            h, w = pad_shape[:2]
            vh, vw = min(int(np.ceil(h / sh)), fh), min(int(np.ceil(w / sw)), fw)
            flags.append(self.single_level_valid_flags((fh, fw), (vh, vw), self.num_base_priors[i], device))
        return flags
