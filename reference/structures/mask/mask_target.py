"""Mask targets (visdet ``structures/mask/mask_target.py`` + ``BitmapMasks.crop_and_resize``).

Each positive prior, clipped to the mask canvas (the batch input shape when the data preprocessor
pads masks), crops its assigned GT bitmap with torchvision RoIAlign (output ``mask_size``, spatial
scale 1, adaptive sampling, aligned) and is binarised ``>= 0.5``.
"""
from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair
from torchvision.ops import roi_align


def mask_target(pos_proposals_list, pos_assigned_gt_inds_list, gt_masks_list, cfg):
    targets = [mask_target_single(p, i, m, cfg)
               for p, i, m in zip(pos_proposals_list, pos_assigned_gt_inds_list, gt_masks_list)]
    return torch.cat(targets) if targets else targets


def mask_target_single(pos_proposals, pos_assigned_gt_inds, gt_masks, cfg):
    """gt_masks: (k, H, W) uint8/bool tensor; returns (num_pos, *mask_size) float {0, 1}."""
    mask_size = _pair(cfg.mask_size)
    num_pos = pos_proposals.size(0)
    if num_pos == 0 or len(gt_masks) == 0:
        return pos_proposals.new_zeros((0,) + mask_size)
    maxh, maxw = gt_masks.shape[-2:]
    boxes = pos_proposals.detach().clone()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, maxw)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, maxh)
    fake_inds = torch.arange(num_pos, dtype=boxes.dtype)[:, None]
    rois = torch.cat([fake_inds, boxes], dim=1)
    masks = gt_masks.index_select(0, pos_assigned_gt_inds.long()).to(dtype=rois.dtype)
    targets = roi_align(masks[:, None], rois, mask_size, 1.0, 0, True).squeeze(1)
    return (targets >= 0.5).float()
