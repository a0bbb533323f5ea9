"""Fast path ``max_pool_taps``: max pooling as shifted maxima, one axis after the other.

XLA:CPU runs ``reduce_window`` as a loop over every output and its whole k x k window, without vectorising over
channels: RTMDet's SPPBottleneck (stride-1 pools of 5, 9 and 13 on the last stage's 20 x 20 x 256 map at 640 x 640)
cost ~12 ms of rtmdet_s's ~100 ms network. A max over a k x k window is the max over its rows of the max over its
columns, and each of those is k - 1 elementwise maxima of shifted slices, which XLA fuses into loops over
contiguous channels. Maxima are exact, so the values are bit-identical to the plain pool (the ``-inf`` padding
never wins a window that holds a real value).

The gradient is the plain pool's (``reduce_window``'s select-and-scatter: the first maximum of each window gets
it, as torch's), through a custom VJP: a chain of ``jnp.maximum`` would split ties, which padded images have
everywhere.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def plain_max_pool2d(x, kernel_size, stride, padding):
    """torch.nn.MaxPool2d on NHWC (implicit -inf padding) as one ``reduce_window``."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1), (1, stride, stride, 1),
        [(0, 0), (padding, padding), (padding, padding), (0, 0)])


def _max_taps(x, axis, k, s, p):
    """Max over windows of ``k`` along ``axis`` (stride ``s``, ``p`` of -inf each side) as shifted maxima."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (p, p)
    xp = jnp.pad(x, pad, constant_values=-jnp.inf) if p else x
    n_out = (x.shape[axis] + 2 * p - k) // s + 1
    y = None
    for t in range(k):
        start = [0] * x.ndim
        limit = list(xp.shape)
        strides = [1] * x.ndim
        start[axis], limit[axis], strides[axis] = t, t + (n_out - 1) * s + 1, s
        tap = jax.lax.slice(xp, start, limit, strides)
        y = tap if y is None else jnp.maximum(y, tap)
    return y


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_taps(x, kernel_size, stride, padding):
    """Same values as :func:`plain_max_pool2d` (bit-identical), with its gradient."""
    return _max_taps(_max_taps(x, 1, kernel_size, stride, padding), 2, kernel_size, stride, padding)


def _fwd(x, kernel_size, stride, padding):
    return max_pool_taps(x, kernel_size, stride, padding), x


def _bwd(kernel_size, stride, padding, x, g):
    _, vjp = jax.vjp(lambda v: plain_max_pool2d(v, kernel_size, stride, padding), x)
    return vjp(g)


max_pool_taps.defvjp(_fwd, _bwd)
