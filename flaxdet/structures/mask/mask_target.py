"""Mask targets (visdet ``structures/mask/mask_target.py``): GT masks cropped to RoIs and resized.

visdet's ``BitmapMasks.crop_and_resize`` is RoIAlign (aligned, adaptive sampling) of the GT bitmap over the
RoI clipped to the mask's extent; targets are binarised ``>= 0.5``.
"""
from __future__ import annotations

import jax.numpy as jnp

from flaxdet.ops.roi_align import roi_align


def mask_target(rois, gt_idx, gt_masks, valid, mask_size):
    """rois (N, R, 4) per image; gt_idx (N, R) the GT each row's target comes from; gt_masks (N, G, Hp, Wp)
    {0, 1}; valid (N*R,) rows to compute (others give zeros). Returns (N*R, mask_size, mask_size) float32."""
    n, g, hp, wp = gt_masks.shape
    clipped = jnp.stack([jnp.clip(rois[..., 0], 0, wp), jnp.clip(rois[..., 1], 0, hp),
                         jnp.clip(rois[..., 2], 0, wp), jnp.clip(rois[..., 3], 0, hp)], -1)
    gt_flat = (jnp.arange(n)[:, None] * g + gt_idx).reshape(-1, 1).astype(clipped.dtype)
    crops = roi_align(gt_masks.reshape(n * g, hp, wp, 1).astype(jnp.float32),
                      jnp.concatenate([gt_flat, clipped.reshape(-1, 4)], 1), mask_size, 1.0, 0, True, valid=valid)
    return (crops[..., 0] >= 0.5).astype(jnp.float32)
