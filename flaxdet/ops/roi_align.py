"""RoIAlign equal to ``torchvision.ops.roi_align`` (CPU kernel ``roi_align_kernel.cpp``) for every RoI.

Features NHWC (B, H, W, C); rois (K, 5) ``[batch_idx, x1, y1, x2, y2]``; output (K, oh, ow, C). The sampling
rules and their separable form are in :mod:`flaxdet.ops.roi_align_plan`.

Plain path (this module): each RoI is ``Wy . F[b] . Wx^T / count`` over its image's whole map, ``chunk``
RoIs at a time (``lax.map`` of ``vmap``, a chunk's maps bounded to ~256 MB), gradients by XLA. Exact, simple,
and on XLA:CPU slow for large maps: the ``roi_align_tiers`` fast path
(:mod:`flaxdet.fast_paths.roi_align_tiers`, on by default on CPU) gives the same values on small crops.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from flaxdet import fast_paths
from flaxdet.fast_paths.roi_align_tiers import roi_align_tiers
from flaxdet.ops.roi_align_plan import contract, plan

_CHUNK_BYTES = 256 << 20  # per chunk of gathered feature maps in the plain path


@partial(jax.jit, static_argnames=("output_size", "spatial_scale", "sampling_ratio", "aligned", "chunk"))
def roi_align_plain(features, rois, valid, output_size, spatial_scale, sampling_ratio, aligned, chunk):
    _, h, w, c = features.shape
    k = rois.shape[0]
    if k == 0:
        return jnp.zeros((0, *output_size, c), features.dtype)
    rois = jax.lax.stop_gradient(rois).astype(jnp.promote_types(features.dtype, jnp.float32))
    args = (output_size, spatial_scale, sampling_ratio, aligned)

    def one(roi):
        (img, _, _, _), wy, wx, count = plan(roi, (h, w), (h, w), args)
        return contract(features[img], wy, wx, count)

    m = max(1, min(chunk, k, _CHUNK_BYTES // (h * w * c * features.dtype.itemsize)))
    n = -(-k // m)
    padded = jnp.concatenate([rois, jnp.zeros((n * m - k, 5), rois.dtype)]).reshape(n, m, 5)
    out = jax.lax.map(jax.vmap(one), padded).reshape(n * m, *output_size, c)[:k]
    return jnp.where(valid[:, None, None, None], out, 0).astype(features.dtype)


def roi_align(features, rois, output_size, spatial_scale: float, sampling_ratio: int = 0,
              aligned: bool = True, chunk: int = 32, *, window: int = 48, big_window: int = 96, valid=None):
    """features (B, H, W, C); rois (K, 5) [batch_idx, x1, y1, x2, y2] in image coordinates ->
    (K, oh, ow, C). ``valid`` (K,) bool, optional: False rows give zeros (and cost nothing on the
    ``roi_align_tiers`` fast path, whose crop sizes ``window`` / ``big_window`` set)."""
    out_hw = (output_size, output_size) if isinstance(output_size, int) else tuple(int(s) for s in output_size)
    valid = jnp.ones(rois.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
    args = (features, rois, valid, out_hw, float(spatial_scale), int(sampling_ratio), bool(aligned), int(chunk))
    if fast_paths.enabled("roi_align_tiers"):
        return roi_align_tiers(*args, int(window), int(big_window))
    return roi_align_plain(*args)
