"""Fast path ``mask_resize_lanes`` (see :mod:`flaxdet.fast_paths`): RTMDet-Ins's mask resize with the detections
as the minor axis.

RTMDet-Ins turns each detection's mask logits (h, w) into a mask on the canvas with torch's bilinear arithmetic:
x8 to the padded size, then to the original image size (two separable passes each, every output value
``x[i0] * w0 + x[i1] * w1``), a sigmoid and a threshold. The plain path (``RTMDetInsHead.masks_single``) does one
detection at a time; its passes gather single values along the minor axis, and XLA:CPU fuses the four passes into
one loop that re-evaluates the earlier passes for every output pixel: ~2.6 ms per 768 x 768 mask, 100 masks
~260 ms of rtmdet_ins_s's ~460 ms end to end at 640 x 640. Here :data:`LANES` detections go through the same passes
together, laid out (H, W, detections): every gather moves a vector of detections and the loop vectorises over it;
each pass is stored before the next reads it. Same products and sums in the same order per value, so the same
masks (tested bit for bit against the plain path). rtmdet_ins_s end to end: ~460 -> ~285 ms.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxdet.fast_paths.stored import stored

LANES = 16  # detections per pass (one AVX-512 float32 vector)


def masks_in_lanes(logits, valid, rows, up, down, inside, thr, interp):
    """logits (D, h, w), valid (D,), rows (traced: rows past it stay empty), up / down: the (H, W) tap pairs of the
    two resizes (down None: no second resize), inside (H', W') bool, ``interp(x, taps, axis)``: one bilinear pass
    (the head's) -> masks (D, H', W') bool, equal to the plain per-detection loop's."""
    d = logits.shape[0]
    lanes = min(LANES, d)
    chunks = -(-d // lanes)
    lg = jnp.pad(logits, ((0, chunks * lanes - d), (0, 0), (0, 0)))
    ok = jnp.pad(valid, (0, chunks * lanes - d))

    one = jnp.minimum(rows, 1).astype(jnp.int32)  # 1 wherever the loop below runs; XLA cannot know it

    def made(f, x):  # stored: fused, each pass would be re-evaluated for every value of the next
        return stored(f, x, one > 0)

    def resize(x, taps_h, taps_w):  # x (H, W, lanes): along W, then H (resize_bilinear's order)
        x = made(lambda v: interp(v, taps_w, 1), x)
        return made(lambda v: interp(v, taps_h, 0), x)

    def body(c, masks):
        x = jnp.transpose(jax.lax.dynamic_slice_in_dim(lg, c * lanes, lanes), (1, 2, 0))
        x = resize(x, *up)
        if down is not None:
            x = resize(x, *down)
        v = jax.lax.dynamic_slice_in_dim(ok, c * lanes, lanes)
        m = made(lambda u: (jax.nn.sigmoid(u) > thr) & inside[:, :, None] & v[None, None, :], x)
        return jax.lax.dynamic_update_slice_in_dim(masks, jnp.transpose(m, (2, 0, 1)), c * lanes, 0)

    out = jnp.zeros((chunks * lanes, *inside.shape), bool)
    return jax.lax.fori_loop(0, (rows + lanes - 1) // lanes, body, out)[:d]
