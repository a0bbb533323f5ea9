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
everywhere; so the custom VJP routes each window's gradient to the first tap holding its maximum, columns first and
then rows -- the first row holding the window's maximum, and in it the first column: row-major order.
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


def _first_max_taps(x, axis, k, s, p):
    """The same values as :func:`_max_taps`, written so that reverse-mode differentiation sends each output's
    gradient to the first tap holding the maximum (NaN counts as the maximum, as in torch)."""
    taps = _taps(x, axis, k, s, p)
    y = jax.lax.stop_gradient(_max_taps(x, axis, k, s, p))
    out, taken = jnp.zeros_like(y), jnp.zeros(y.shape, bool)
    for tap in taps:
        hit = ~taken & ((tap == y) | (jnp.isnan(tap) & jnp.isnan(y)))
        out, taken = jnp.where(hit, tap, out), taken | hit
    return out


def _pool(x, kernel_size, stride, padding, taps):
    return taps(taps(x, 2, kernel_size, stride, padding), 1, kernel_size, stride, padding)  # columns, then rows


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_taps(x, kernel_size, stride, padding):
    """Same values as :func:`plain_max_pool2d` (bit-identical), and the same gradient."""
    return _pool(x, kernel_size, stride, padding, _max_taps)


def _fwd(x, kernel_size, stride, padding):
    return max_pool_taps(x, kernel_size, stride, padding), x


def _bwd(kernel_size, stride, padding, x, g):
    _, vjp = jax.vjp(lambda v: _pool(v, kernel_size, stride, padding, _first_max_taps), x)
    return vjp(g)


max_pool_taps.defvjp(_fwd, _bwd)
