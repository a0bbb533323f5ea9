"""AnchorGenerator (visdet ``task_modules/prior_generators/anchor_generator.py``, v2.0 style).

Base anchors centred at ``center_offset * base_size``, not rounded; grid anchors ordered (y, x, anchor).
Anchors are computed in numpy float32 at trace time (static: they depend on the feature sizes only);
``valid_flags`` depends on each image's padded shape and is traced.
"""
from __future__ import annotations

import jax.numpy as jnp
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


class AnchorGenerator:
    """Static anchor grids per level, from an ``AnchorGeneratorCfg``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.strides = [(s, s) if isinstance(s, int | float) else tuple(s) for s in cfg.strides]
        sizes = cfg.base_sizes or [min(s) for s in self.strides]
        if cfg.scales is not None:
            scales = cfg.scales
        else:
            scales = [cfg.octave_base_scale * 2 ** (i / cfg.scales_per_octave) for i in range(cfg.scales_per_octave)]
        self.base_anchors = [base_anchors(b, scales, cfg.ratios, cfg.scale_major, cfg.center_offset,
                                          None if cfg.centers is None else cfg.centers[i])
                             for i, b in enumerate(sizes)]
        self.num_base_priors = [len(b) for b in self.base_anchors]

    def grid_priors(self, featmap_sizes):
        """Per level (H*W*A, 4) numpy anchors for static feature sizes [(H, W), ...]."""
        return [grid_anchors(self.base_anchors[i], h, w, *self.strides[i]) for i, (h, w) in enumerate(featmap_sizes)]

    def valid_flags(self, featmap_sizes, pad_shape):
        """(sum H*W*A,) bool: a location is valid iff inside the image's own padded extent ``pad_shape``
        (h, w; traced), all levels concatenated like :meth:`grid_priors`."""
        flags = []
        for lvl, (fh, fw) in enumerate(featmap_sizes):
            sw, sh = self.strides[lvl]
            vh = jnp.minimum(jnp.ceil(pad_shape[0] / sh).astype(jnp.int32), fh)
            vw = jnp.minimum(jnp.ceil(pad_shape[1] / sw).astype(jnp.int32), fw)
            v = (jnp.arange(fh)[:, None] < vh) & (jnp.arange(fw)[None, :] < vw)
            flags.append(jnp.repeat(v.reshape(-1), self.num_base_priors[lvl]))
        return jnp.concatenate(flags)
