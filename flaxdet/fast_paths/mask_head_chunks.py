"""Fast path ``mask_head_chunks`` (see :mod:`flaxdet.fast_paths`): the inference mask head on chunks of rows.

At test time the mask head (four 3x3 convolutions at 14x14, a deconvolution, a 1x1 convolution) runs on the
detections of every image in the batch at once: 400 rows at batch 4 with 100 detections each. On XLA:CPU its
time grows faster than the rows (measured on 2 cores: 100 rows 0.61 s, 400 rows 3.1 s, against PyTorch's 0.86 /
3.5 s), the activations of 400 rows (80 MB per layer) no longer fitting the caches; run as a ``lax.map`` over
chunks of at most :data:`CHUNK` rows it takes 2.1-2.2 s. Chunk size, measured on the R50 head (4 x 256 channels,
80 classes; median of 5): 100 rows in one call 318 ms, chunks of <= 50 281-284 ms, <= 25 253-262 ms, <= 20
239-246 ms, <= 10 246 ms; 400 rows: chunks of <= 50 1101 ms, <= 20 986 ms. Plain path: all rows in one call.
Chunks can round differently from the one call (other convolution shapes), so the two are compared within float
tolerance (``tests/ops/test_mask_paste_windows.py``), and a batch's masks are the same whichever other rows share a
chunk only up to that rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxdet import fast_paths

CHUNK = 20  # rows per chunk at most


def run_mask_head(head, x):
    """``head(x)`` for x (R, h, w, C): in ceil(R / CHUNK) equal chunks (the last padded) on the fast path."""
    r = x.shape[0]
    if not fast_paths.enabled("mask_head_chunks") or r <= CHUNK:
        return head(x)
    m = -(-r // CHUNK)
    c = -(-r // m)
    xs = jnp.pad(x, [(0, m * c - r)] + [(0, 0)] * (x.ndim - 1)).reshape(m, c, *x.shape[1:])
    out = jax.lax.map(head, xs)
    return out.reshape(m * c, *out.shape[2:])[:r]
