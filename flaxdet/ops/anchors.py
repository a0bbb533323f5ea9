"""AnchorGenerator (visdet, v2.0 style): base anchors centred at center_offset*base_size, not
rounded; grid anchors ordered (y, x, anchor). Computed in numpy float32 at trace time (static)."""
from __future__ import annotations

import numpy as np


def base_anchors(base_size, scales, ratios, scale_major=True, center_offset=0.0, center=None):
    w = h = base_size
    xc, yc = (center_offset * w, center_offset * h) if center is None else center
    ratios = np.asarray(ratios, np.float32)
    scales = np.asarray(scales, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    if scale_major:
        ws = (np.float32(w) * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (np.float32(h) * h_ratios[:, None] * scales[None, :]).reshape(-1)
    else:
        ws = (np.float32(w) * scales[:, None] * w_ratios[None, :]).reshape(-1)
        hs = (np.float32(h) * scales[:, None] * h_ratios[None, :]).reshape(-1)
    half = np.float32(0.5)
    xc, yc = np.float32(xc), np.float32(yc)
    return np.stack([xc - half * ws, yc - half * hs, xc + half * ws, yc + half * hs], -1).astype(np.float32)


def grid_anchors(base: np.ndarray, feat_h: int, feat_w: int, stride_w: float, stride_h: float) -> np.ndarray:
    shift_x = np.arange(feat_w, dtype=np.float32) * np.float32(stride_w)
    shift_y = np.arange(feat_h, dtype=np.float32) * np.float32(stride_h)
    xx = np.tile(shift_x, feat_h)
    yy = np.repeat(shift_y, feat_w)
    shifts = np.stack([xx, yy, xx, yy], -1)
    return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


def valid_flags(feat_h, feat_w, pad_h, pad_w, stride_w, stride_h, num_base):
    """Training-time flags: location valid iff inside the image's own padded extent."""
    vh = min(int(np.ceil(pad_h / stride_h)), feat_h)
    vw = min(int(np.ceil(pad_w / stride_w)), feat_w)
    v = (np.arange(feat_h)[:, None] < vh) & (np.arange(feat_w)[None, :] < vw)
    return np.repeat(v.reshape(-1), num_base)
