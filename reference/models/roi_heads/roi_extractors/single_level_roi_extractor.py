"""SingleRoIExtractor with torchvision RoIAlign (visdet ``single_level_roi_extractor.py``)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from flaxdet.config import RoIAlignCfg, SingleRoIExtractorCfg


class RoIAlign(nn.Module):
    """visdet ``cv/ops/roi_align.py``: always torchvision; ``aligned`` defaults True."""

    def __init__(self, cfg: RoIAlignCfg, spatial_scale: float):
        super().__init__()
        size = cfg.output_size
        self.output_size = (size, size) if isinstance(size, int) else tuple(size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(cfg.sampling_ratio)
        self.aligned = bool(cfg.aligned)

    def forward(self, feats, rois):
        return roi_align(feats, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


class SingleRoIExtractor(nn.Module):
    def __init__(self, cfg: SingleRoIExtractorCfg):
        super().__init__()
        self.cfg = cfg
        self.roi_layers = nn.ModuleList([RoIAlign(cfg.roi_layer, 1 / s) for s in cfg.featmap_strides])
        self.out_channels = cfg.out_channels
        self.featmap_strides = tuple(cfg.featmap_strides)
        self.finest_scale = cfg.finest_scale

    @property
    def num_inputs(self):
        return len(self.featmap_strides)

    def map_roi_levels(self, rois, num_levels):
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        lvls = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return lvls.clamp(min=0, max=num_levels - 1).long()

    def forward(self, feats, rois):
        out_size = self.roi_layers[0].output_size
        num_levels = len(feats)
        roi_feats = feats[0].new_zeros(rois.size(0), self.out_channels, *out_size)
        if num_levels == 1:
            return self.roi_layers[0](feats[0], rois)
        target_lvls = self.map_roi_levels(rois, num_levels)
        for i in range(num_levels):
            inds = (target_lvls == i).nonzero(as_tuple=False).squeeze(1)
            if inds.numel() > 0:
                roi_feats[inds] = self.roi_layers[i](feats[i], rois[inds])
            else:  # visdet keeps every level in the autograd graph
                roi_feats = roi_feats + feats[i].sum() * 0.0
        return roi_feats
