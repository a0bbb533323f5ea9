"""DetDataPreprocessor (visdet): BGR->RGB, (x - mean) / std, zero padding (in normalised space)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flaxdet.config import DetDataPreprocessorCfg
from flaxdet.nn import exact_div


class DetDataPreprocessor(nnx.Module):
    """Inputs arrive already padded to the batch shape (static, a multiple of pad_size_divisor) as
    uint8 NHWC in the loader's channel order; ``img_shapes`` (N, 2) marks each image's extent. The
    padding is re-zeroed after normalisation, which is exactly visdet's normalise-then-pad."""

    def __init__(self, cfg: DetDataPreprocessorCfg, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg

    def __call__(self, images, img_shapes):
        x = images
        if self.cfg.bgr_to_rgb or self.cfg.rgb_to_bgr:
            x = x[..., ::-1]
        x = x.astype(jnp.float32)
        x = exact_div(x - jnp.asarray(self.cfg.mean, jnp.float32), jnp.asarray(self.cfg.std, jnp.float32))
        h, w = x.shape[1:3]
        inside = ((jnp.arange(h)[None, :, None] < img_shapes[:, 0, None, None])
                  & (jnp.arange(w)[None, None, :] < img_shapes[:, 1, None, None]))
        return jnp.where(inside[..., None], x, self.cfg.pad_value)
