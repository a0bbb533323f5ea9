"""SingleRoIExtractor (visdet ``single_level_roi_extractor.py``): level by sqrt(area), RoIAlign per level."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flaxdet.config import SingleRoIExtractorCfg
from flaxdet.ops.roi_align import roi_align


class RoIAlign(nnx.Module):
    """visdet RoIAlign (torchvision semantics; aligned=True by default). No parameters."""

    def __init__(self, cfg, spatial_scale: float):
        size = cfg.output_size
        self.output_size = (size, size) if isinstance(size, int) else tuple(size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(cfg.sampling_ratio)
        self.aligned = bool(cfg.aligned)

    def __call__(self, feats, rois, valid=None):
        return roi_align(feats, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         valid=valid)


def map_roi_levels(rois, num_levels, finest_scale=56):
    scale = jnp.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    lvls = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
    return jnp.clip(lvls, 0, num_levels - 1).astype(jnp.int32)


class SingleRoIExtractor(nnx.Module):
    def __init__(self, cfg: SingleRoIExtractorCfg, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.roi_layers = nnx.List([RoIAlign(cfg.roi_layer, 1 / s) for s in cfg.featmap_strides])
        self.num_inputs = len(cfg.featmap_strides)

    def __call__(self, feats, rois, valid=None):
        """feats: per level (B, H, W, C); rois (K, 5); valid (K,) bool, optional (False rows are skipped
        and give zeros). Returns (K, oh, ow, C)."""
        feats = feats[: self.num_inputs]
        if len(feats) == 1:
            return self.roi_layers[0](feats[0], rois, valid=valid)
        lvls = map_roi_levels(rois, len(feats), self.cfg.finest_scale)
        out = None
        for i, f in enumerate(feats):
            v = lvls == i if valid is None else (lvls == i) & valid
            r = self.roi_layers[i](f, rois, valid=v)  # other levels' RoIs are skipped, not computed
            out = r if out is None else jnp.where((lvls == i)[:, None, None, None], r, out)
        return out
