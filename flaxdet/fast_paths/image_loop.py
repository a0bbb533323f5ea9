"""Fast path ``image_loop`` (see :mod:`flaxdet.fast_paths`): the inference trunk one image at a time.

At test time the convolutional trunk (preprocessing, backbone, neck, the dense heads' convolutions) is per image:
nothing in it mixes images (BatchNorm runs on its running statistics). On XLA:CPU a batch of large images is
slower per image than one image, each layer's activations for the whole batch no longer fitting the caches before
the next layer reads them. Measured on 2 cores (per image, median of 3): Mask R-CNN R50 backbone + FPN + RPN
convolutions at 800x1088, batch 4: 1.04 s as one batch, 0.86 s image by image (batch 1: 0.87-0.91 s); RTMDet-s
backbone + neck + head at 640x640, batch 8: 115 ms as one batch, 90 ms image by image (batch 1: 98 ms).

:func:`per_image` runs a function of batched arrays as a ``lax.map`` over the images (one compiled body, each
image its own batch of 1), so a batch's trunk outputs are those of each image alone. Plain path: the whole batch
in one call. The two are compared in ``tests/fast_paths/test_image_loop.py``.
"""
from __future__ import annotations

import jax

from flaxdet import fast_paths


def per_image(fn, *args):
    """``fn(*args)`` for pytrees ``args`` whose leaves all lead with the batch axis N, and whose result's leaves do
    too: on the fast path (N > 1) as ``fn`` on each image's slice (a batch of 1), stacked."""
    leaves = jax.tree.leaves(args)
    n = leaves[0].shape[0]
    if n <= 1 or not fast_paths.enabled("image_loop"):
        return fn(*args)
    if any(t.shape[:1] != (n,) for t in leaves):
        raise ValueError(f"per_image: every input must lead with the batch axis {n}: "
                         f"{[tuple(t.shape) for t in leaves]}")
    out = jax.lax.map(lambda a: fn(*jax.tree.map(lambda t: t[None], a)), args)
    return jax.tree.map(lambda t: t.reshape(n, *t.shape[2:]), out)
