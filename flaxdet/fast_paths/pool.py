"""Fast path ``max_pool_taps``: max pooling as shifted maxima, one axis after the other.

XLA:CPU runs ``reduce_window`` as a loop over every output and its whole k x k window, without vectorising over
channels: RTMDet's SPPBottleneck (stride-1 pools of 5, 9 and 13 on the last stage's 20 x 20 x 256 map at 640 x 640)
cost ~12 ms of rtmdet_s's ~100 ms network. A max over a k x k window is the max over its rows of the max over its
columns, and each of those is k - 1 elementwise maxima of shifted slices, which XLA fuses into loops over
contiguous channels. Maxima are exact, so the values are bit-identical to the plain pool (the ``-inf`` padding
never wins a window that holds a real value).

The gradient goes where torch's goes: to the first maximum of each window in row-major order (``reduce_window``'s
select-and-scatter does the same, but XLA:CPU runs it, and the pool it recomputes, as slowly as the forward: ~0.5 s
of RTMDet-s's batch-8 train step). A plain chain of ``jnp.maximum`` would split ties, which padded images have
everywhere; so the custom VJP routes each window's gradient to the first tap holding its maximum, rows first and
then columns -- the first row holding the window's maximum, and in it the first column: row-major order.

The backward stores each of its four steps (column maxima, the rows' first-maximum tap, the gradient routed along
the rows, the columns' first-maximum tap) before the next reads it (:mod:`flaxdet.fast_paths.stored`). Written as one
expression (the VJP of a first-maximum select chain), XLA:CPU fused it into one loop that re-evaluated every
earlier step for each tap of the next: RTMDet-s's SPP backward (pools of 5, 9 and 13 on 8 x 20 x 20 x 256) took
322 ms of the batch-8 train step, 400 ms alone; stored, 20 ms alone, the same values bit for bit.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from flaxdet.fast_paths.stored import stored


def plain_max_pool2d(x, kernel_size, stride, padding):
    """torch.nn.MaxPool2d on NHWC (implicit -inf padding) as one ``reduce_window``."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1), (1, stride, stride, 1),
        [(0, 0), (padding, padding), (padding, padding), (0, 0)])


def _taps(x, axis, k, s, p):
    """The ``k`` shifted slices of ``x`` along ``axis`` whose elementwise max is a window-``k`` max pool (stride
    ``s``, ``p`` of -inf each side)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (p, p)
    xp = jnp.pad(x, pad, constant_values=-jnp.inf) if p else x
    n_out = (x.shape[axis] + 2 * p - k) // s + 1
    out = []
    for t in range(k):
        start, limit, strides = [0] * x.ndim, list(xp.shape), [1] * x.ndim
        start[axis], limit[axis], strides[axis] = t, t + (n_out - 1) * s + 1, s
        out.append(jax.lax.slice(xp, start, limit, strides))
    return out


def _max_taps(x, axis, k, s, p):
    y = None
    for tap in _taps(x, axis, k, s, p):
        y = tap if y is None else jnp.maximum(y, tap)
    return y


def _first_max_index(x, axis, k, s, p):
    """For each output of :func:`_max_taps`, the first of its ``k`` taps holding the maximum (NaN counts as the
    maximum, as in torch), as int32."""
    taps = _taps(x, axis, k, s, p)
    y = _max_taps(x, axis, k, s, p)
    idx = jnp.full(y.shape, k, jnp.int32)
    for t in reversed(range(k)):
        idx = jnp.where((taps[t] == y) | (jnp.isnan(taps[t]) & jnp.isnan(y)), t, idx)
    return idx


def _route(g, idx, axis, k, s, p, n_in):
    """The transpose of picking tap ``idx`` along ``axis`` (window ``k``, stride ``s``, padding ``p``, ``n_in``
    inputs): each output's gradient ``g`` added at the input position of its tap; the padding dropped."""
    n_out, size = g.shape[axis], n_in + 2 * p
    zero = jnp.zeros((), g.dtype)
    out = None
    for t in range(k):
        cfg = [(0, 0, 0)] * g.ndim
        cfg[axis] = (t, size - (t + (n_out - 1) * s + 1), s - 1)  # output o lands on padded input o * s + t
        part = jax.lax.pad(jnp.where(idx == t, g, zero), zero, cfg)
        out = part if out is None else out + part
    return jax.lax.slice_in_dim(out, p, p + n_in, axis=axis)


def _stored(f, x, like):
    """``f(x)`` stored (:func:`flaxdet.fast_paths.stored.stored`); ``like``'s first value equal to itself is the
    predicate XLA cannot decide."""
    first = like.reshape(-1)[0]
    return stored(f, x, first == first)


def _pool(x, kernel_size, stride, padding, taps):
    return taps(taps(x, 2, kernel_size, stride, padding), 1, kernel_size, stride, padding)  # columns, then rows


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_taps(x, kernel_size, stride, padding):
    """Same values as :func:`plain_max_pool2d` (bit-identical), and the same gradient."""
    return _pool(x, kernel_size, stride, padding, _max_taps)


def _fwd(x, kernel_size, stride, padding):
    return max_pool_taps(x, kernel_size, stride, padding), x


def _bwd(kernel_size, stride, padding, x, g):
    """The pool's VJP (columns' maxima first, then rows'), undone: rows, then columns."""
    k, s, p = kernel_size, stride, padding
    cols = _stored(lambda v: _max_taps(v, 2, k, s, p), x, g)
    row_tap = _stored(lambda v: _first_max_index(v, 1, k, s, p), cols, g)
    g_cols = _stored(lambda v: _route(v, row_tap, 1, k, s, p, cols.shape[1]), g, g)
    col_tap = _stored(lambda v: _first_max_index(v, 2, k, s, p), x, g)
    return (_route(g_cols, col_tap, 2, k, s, p, x.shape[2]),)


max_pool_taps.defvjp(_fwd, _bwd)
