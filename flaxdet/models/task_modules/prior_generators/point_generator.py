"""MlvlPointGenerator (visdet ``task_modules/prior_generators/point_generator.py``): one point prior per
feature-map cell, ``(x, y) = ((j + offset) * stride_w, (i + offset) * stride_h)`` for cell (row i, column j),
ordered row-major, levels concatenated. RTMDet uses ``offset=0``: the top-left corner of the cell.

Priors depend on the static feature sizes only and are numpy float32 (constants under jit); ``valid_flags``
depends on each image's padded shape and is traced.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


class MlvlPointGenerator:
    def __init__(self, cfg):
        self.cfg = cfg
        self.strides = [(s, s) if isinstance(s, int | float) else tuple(s) for s in cfg.strides]  # (w, h)
        self.offset = cfg.offset

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_priors(self) -> list[int]:
        return [1] * len(self.strides)

    def single_level_grid_priors(self, featmap_size, level_idx: int, with_stride: bool = False) -> np.ndarray:
        """(H*W, 2) points (x, y), or with ``with_stride`` (H*W, 4) = (x, y, stride_w, stride_h)."""
        feat_h, feat_w = featmap_size
        stride_w, stride_h = self.strides[level_idx]
        off = np.float32(self.offset)
        shift_x = (np.arange(feat_w, dtype=np.float32) + off) * np.float32(stride_w)
        shift_y = (np.arange(feat_h, dtype=np.float32) + off) * np.float32(stride_h)
        xx, yy = np.tile(shift_x, feat_h), np.repeat(shift_y, feat_w)
        cols = [xx, yy]
        if with_stride:
            cols += [np.full_like(xx, stride_w), np.full_like(yy, stride_h)]
        return np.stack(cols, -1).astype(np.float32)

    def grid_priors(self, featmap_sizes, with_stride: bool = False) -> list[np.ndarray]:
        """Per level the priors of :meth:`single_level_grid_priors` for static sizes [(H, W), ...]."""
        return [self.single_level_grid_priors(s, i, with_stride) for i, s in enumerate(featmap_sizes)]

    def valid_flags(self, featmap_sizes, pad_shape):
        """(sum H*W,) bool: a point is valid iff its cell lies inside the image's padded extent ``pad_shape``
        (h, w; traced): ``min(ceil(h / stride), H)`` rows and likewise columns, levels concatenated."""
        flags = []
        for lvl, (fh, fw) in enumerate(featmap_sizes):
            sw, sh = self.strides[lvl]
            vh = jnp.minimum(jnp.ceil(pad_shape[0] / sh).astype(jnp.int32), fh)
            vw = jnp.minimum(jnp.ceil(pad_shape[1] / sw).astype(jnp.int32), fw)
            flags.append(((jnp.arange(fh)[:, None] < vh) & (jnp.arange(fw)[None, :] < vw)).reshape(-1))
        return jnp.concatenate(flags)
