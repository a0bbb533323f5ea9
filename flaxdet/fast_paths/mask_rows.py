"""Fast path ``mask_row_buckets`` (see :mod:`flaxdet.fast_paths`): the mask branch on a row bucket.

visdet runs the mask branch on the detections (inference) or positives (training) it has, often a handful
per image; at a static D (or Spos) rows per image flaxdet would pay for all of them every time (the mask
head's four 3x3 convolutions at 14x14 on 256 rows: ~2.3 s forward on 2 CPU cores, backward twice that). On
this path the mask branch runs on the first ``rows`` rows per image, ``rows`` one of :func:`mask_buckets`
(D/8, D/4, D/2, D): chosen on the host from the count read between two jits (inference:
:class:`flaxdet.inference.Detector`), from recent steps with a re-run on overflow (training:
:class:`flaxdet.training.step.TrainState`), or by a ``lax.switch`` inside one jit (``rows=None``, the
parity stages). Plain path: every row, one shape (``mask_buckets(D) == (D,)``). Rows past the bucket are
zeros either way; the tests compare the two (``tests/training/test_mask_rows.py``).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from flaxdet import fast_paths


def mask_buckets(d):
    """Static row counts the mask branch is compiled for: D/8, D/4, D/2, D (rounded up, distinct) on
    the fast path, (D,) on the plain one."""
    if d <= 0:
        return (0,)
    if not fast_paths.enabled("mask_row_buckets"):
        return (d,)
    return tuple(sorted({max(1, -(-d // f)) for f in (8, 4, 2, 1)}))


def mask_rows_for_count(d, count):
    """The static ``rows`` of :func:`run_mask_rows` for ``count`` valid rows (of D) per image."""
    return 0 if count <= 0 else next(k for k in mask_buckets(d) if k >= count)


def run_mask_rows(run, d, valid, rows=None):
    """``run(k)`` (the mask branch on the first k of D rows per image, padded back to D) on ``rows``
    rows (static; 0: zeros) or, with ``rows=None``, by ``lax.switch`` on the smallest of
    ``mask_buckets(D)`` holding the largest count of ``valid`` (N, D) per image (zeros when none; on the
    plain path simply all D rows). XLA:CPU runs conditional branches slower (measured 1.0 s static vs
    1.1 s in the switch for 100 detections at 800x1333), hence the static form where the caller can
    read the count."""
    if rows is None and not fast_paths.enabled("mask_row_buckets"):
        return run(d)
    sizes = mask_buckets(d)
    shapes = jax.eval_shape(lambda: run(sizes[0]))
    none = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)  # noqa: E731
    if rows is not None:
        return run(int(rows)) if rows > 0 else none()
    count = valid.sum(1).max()
    branch = jnp.where(count > 0, 1 + jnp.searchsorted(jnp.asarray(sizes), count), 0)
    return jax.lax.switch(branch, [none] + [partial(run, k) for k in sizes])


def pad_rows(a, n, d, flat=False):
    """Rows of a bucket back to all D: (N, k, ...) -> (N, D, ...), zeros past row k of each image; with
    ``flat`` (N*k, ...) -> (N*D, ...)."""
    if flat:
        a = a.reshape(n, -1, *a.shape[1:])
    a = jnp.pad(a, [(0, 0), (0, d - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(n * d, *a.shape[2:]) if flat else a
