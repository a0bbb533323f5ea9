"""Fast path ``conv_vjp`` and ``conv1x1_matmul`` (see :mod:`flaxdet.fast_paths`): convolutions whose
gradients, or whose 1x1 form, are written by hand because XLA:CPU's own are slow.

* :func:`conv_vjp` -- the plain forward convolution with a custom VJP (:func:`_conv_bwd`): weight gradients
  as one matmul (1x1 kernels) or accumulated over blocks of output rows (:func:`blocked_weight_grad`), strided
  input gradients by phases (:func:`phase_input_grad`), stride-1 input gradients as a flipped-kernel
  convolution. Used for the kernels :func:`wants_custom_vjp` selects (every ungrouped one). Reverse-mode only.
* :func:`conv1x1` -- an unpadded 1x1 convolution as one matmul over the pixels.

Plain path: :func:`flaxdet.ops.conv.conv2d` (XLA's convolution and XLA's gradients); the tests compare the
two in float64 (``tests/nn/test_conv_gradients.py``).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from flaxdet import fast_paths
from flaxdet.fast_paths import onednn
from flaxdet.ops.conv import conv2d as plain_conv2d


def forward(x, w, stride, padding, dilation, groups, precision, out_dtype):
    """A forward convolution: oneDNN's (fast path ``onednn_conv``, :mod:`.onednn`) where that is on and takes the
    case, else XLA's. ``padding``: per axis an int (symmetric) or a (low, high) pair."""
    if fast_paths.enabled("onednn_conv") and onednn.supports(x, w, stride, padding, dilation, groups, out_dtype):
        return onednn.conv(x, w, tuple(stride), tuple(padding), tuple(dilation), precision, out_dtype)
    return onednn.plain(x, w, stride, padding, dilation, precision, out_dtype, groups)


def matmul_weight_grad(w, groups):
    """Whether the weight gradient of a conv with weight ``w`` (kh, kw, in, out) is computed by hand
    (``_conv_bwd``: one matmul for a 1x1 kernel, :func:`blocked_weight_grad` for larger ones) rather than by
    XLA's transposed convolution, which treats the batch x space extent as a convolution window: slow for 1x1
    kernels, wide channels, and narrow channels at high resolution. Measured on a 2-core EPYC (ms, XLA / by
    hand): 1x1 256->512 stride 2 at 120x160 b2 243 / 19, 1x1 256->64 109 / 16; 3x3 blocked: 16->32 at 320x320
    b8 242 / 66, 32->32 at 160x160 b8 75 / 26, 128->128 at 80x80 b8 159 / 64, 64->64 at 200x336 b2 196 / 72,
    256->256 at 200x336 b1 1356 / 301, 256 on 100 RoIs of 14x14 129 / 118, 128->128 at 40x40 b8 16 / 16."""
    return groups == 1


def wants_custom_vjp(w, stride, dilation, groups):
    """Whether ``conv2d`` takes its gradients from :func:`_conv_bwd`: a matmul weight gradient
    (:func:`matmul_weight_grad`), or a strided kernel whose input gradient is cheaper by phases
    (:func:`phase_input_grad`) than by XLA's zero-dilated transposed convolution."""
    strided = groups == 1 and dilation == (1, 1) and stride != (1, 1) and w.shape[:2] != (1, 1)
    return matmul_weight_grad(w, groups) or strided


def phase_input_grad(gy, w, in_hw, stride, padding, precision, out_dtype):
    """Input gradient of a strided convolution (groups 1, dilation 1) as ``s_h * s_w`` stride-1
    convolutions of ``gy``, one per output phase, interleaved. XLA's own transpose convolves a
    zero-dilated ``gy`` (``lhs_dilation``): ``s_h * s_w`` times the multiply-adds, on XLA:CPU's slow
    dilated path (measured on a 2-core EPYC, ms, XLA / phases: 3x3 128->128 on 200x336 b2 193 / 92,
    256 on 100x168 85 / 52, 512 on 50x84 66 / 35).

    Padded input row ``r = s*u + ph`` receives ``sum_m gy[u - m] * w[ph + s*m]``: phase ``ph`` is a
    correlation of ``gy`` (padded ``M - 1`` before) with the flipped sub-kernel ``w[ph::s][::-1]``."""
    n, ho, wo, _ = gy.shape
    cin = w.shape[2]
    (sh, sw), (ph, pw) = stride, padding
    u0, u1 = -(-(in_hw[0] + 2 * ph) // sh), -(-(in_hw[1] + 2 * pw) // sw)
    wt = w.transpose(0, 1, 3, 2)  # (kh, kw, out, in): gy's channels in, x's channels out
    rows = []
    for a in range(sh):
        cols = []
        for b in range(sw):
            sub = wt[a::sh][::-1][:, b::sw][:, ::-1]
            if sub.shape[0] == 0 or sub.shape[1] == 0:  # kernel narrower than the stride: no tap
                cols.append(jnp.zeros((n, u0, u1, cin), gy.dtype if out_dtype is None else out_dtype))
                continue
            pads = ((sub.shape[0] - 1, u0 - ho), (sub.shape[1] - 1, u1 - wo))
            cols.append(forward(gy, sub, (1, 1), pads, (1, 1), 1, precision, out_dtype))
        rows.append(jnp.stack(cols, 3))  # (n, u0, u1, sw, cin)
    g = jnp.stack(rows, 2).reshape(n, u0 * sh, u1 * sw, cin)
    return g[:, ph:ph + in_hw[0], pw:pw + in_hw[1]]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def conv_vjp(x, w, stride, padding, dilation, groups, precision, out_dtype):
    return forward(x, w, stride, padding, dilation, groups, precision, out_dtype)


def _conv_fwd(x, w, stride, padding, dilation, groups, precision, out_dtype):
    return forward(x, w, stride, padding, dilation, groups, precision, out_dtype), (x, w)


def _conv_bwd(stride, padding, dilation, groups, precision, out_dtype, res, gy):
    """Input gradient: at stride 1 a flipped-kernel convolution, strided (dilation 1) by phases
    (:func:`phase_input_grad`), else XLA's transpose. Weight gradient, where :func:`matmul_weight_grad` says so
    (groups 1): a 1x1 kernel's as one matmul over all N*Ho*Wo output positions, larger kernels' by
    :func:`blocked_weight_grad` (at least float32 accumulation; products in the compute dtype); else XLA's
    transpose."""
    x, w = res
    kh, kw, cin, cout = w.shape
    back = [d * (k - 1) - p for d, k, p in zip(dilation, (kh, kw), padding)]
    if stride == (1, 1) and min(back) >= 0 and groups == 1:
        # stride 1: the input gradient is a forward convolution of gy with the flipped, in/out-swapped
        # kernel. XLA's own transpose is a different convolution that XLA:CPU runs without its fast
        # kernels inside lax.switch branches (the training mask branch): measured 2.2x slower there.
        wf = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
        gx = forward(gy.astype(x.dtype), wf, (1, 1), tuple(back), dilation, 1, precision, out_dtype).astype(x.dtype)
    elif groups == 1 and dilation == (1, 1):
        gx = phase_input_grad(gy.astype(x.dtype), w, x.shape[1:3], stride, padding, precision,
                               out_dtype).astype(x.dtype)
    else:
        gx = jax.vjp(lambda v: plain_conv2d(v, w, stride, padding, dilation, groups, precision, out_dtype), x)[1](gy)[0]
    if not matmul_weight_grad(w, groups):
        return gx, jax.vjp(lambda v: plain_conv2d(x, v, stride, padding, dilation, groups, precision, out_dtype),
                           w)[1](gy)[0]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    if (kh, kw) == (1, 1):  # one matmul over the (strided) pixels
        xs = x[:, ::stride[0], ::stride[1], :] if stride != (1, 1) else x
        gw = jnp.matmul(xs.reshape(-1, cin).T, gy.astype(x.dtype).reshape(-1, cout), precision=precision,
                        preferred_element_type=acc)
        return gx, gw.reshape(w.shape).astype(w.dtype)
    return gx, blocked_weight_grad(x, gy.astype(x.dtype), w.shape, stride, padding, dilation, precision,
                                   acc).astype(w.dtype)


PATCH_BYTES = 3 << 20  # a weight-gradient block's patches: 8 output rows where they fit in this, else 4


def blocked_weight_grad(x, gy, w_shape, stride, padding, dilation, precision, acc_dtype):
    """The weight gradient of a convolution (groups 1), ``gw[a, b] = sum_{n,i,j} x_pad[n, s*i + d*a, s*j + d*b,
    :]^T gy[n, i, j, :]``, accumulated over blocks of 4 or 8 output rows of one image: each block's patches
    (rows * Wo, kh * kw * in) are built from cache and contracted with its gradient rows in one matmul
    (``acc_dtype`` accumulation; products in ``x``'s dtype). Blocks whose patches fit :data:`PATCH_BYTES` take 8
    rows (measured best at 80x80 and 40x40; 4 at 200x336). The kh * kw shifted copies of a whole batch that one
    matmul per tap needs are never made."""
    kh, kw, cin, cout = w_shape
    n, ho, wo, _ = gy.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    eight = wo * kh * kw * cin * x.dtype.itemsize * 8 <= PATCH_BYTES and ho % 8 == 0
    rows = 8 if eight else 4
    blocks = -(-ho // rows)
    extra = blocks * rows - ho  # zero gradient rows past the end: add nothing
    span = (rows - 1) * sh + (kh - 1) * dh + 1  # input rows one block reads
    xp = jnp.pad(x, ((0, 0), (ph, ph + extra * sh), (pw, pw), (0, 0)))
    gp = jnp.pad(gy, ((0, 0), (0, extra), (0, 0), (0, 0)))

    def block(i, total):
        img, r = i // blocks, (i % blocks) * rows
        xb = jax.lax.dynamic_slice(xp, (img, r * sh, 0, 0), (1, span, xp.shape[2], cin))[0]
        gb = jax.lax.dynamic_slice(gp, (img, r, 0, 0), (1, rows, wo, cout))[0].reshape(rows * wo, cout)
        cols = [jax.lax.slice(xb, (a * dh, b * dw, 0), (a * dh + (rows - 1) * sh + 1, b * dw + (wo - 1) * sw + 1, cin),
                              (sh, sw, 1)).reshape(rows * wo, cin) for a in range(kh) for b in range(kw)]
        patches = jnp.concatenate(cols, axis=1)
        return total + jnp.matmul(patches.T, gb, precision=precision, preferred_element_type=acc_dtype)

    gw = jax.lax.fori_loop(0, n * blocks, block, jnp.zeros((kh * kw * cin, cout), acc_dtype))
    return gw.reshape(w_shape)


conv_vjp.defvjp(_conv_fwd, _conv_bwd)


def conv1x1(x, w, stride, precision, out_dtype):
    """An unpadded 1x1 convolution as one matmul over the (strided) pixels. XLA:CPU runs it 1.2-4x
    faster than the same convolution (measured on a 2-core EPYC, ms, conv / matmul, one 200x336 map:
    256->1024 340 / 309, 1024->256 568 / 227, 256->64 51 / 13, 64->256 57 / 37), and its gradients are
    matmuls too (no transposed convolution)."""
    if stride != (1, 1):
        x = x[:, ::stride[0], ::stride[1], :]
    n, h, wd, c = x.shape
    y = jnp.matmul(x.reshape(n * h * wd, c), w.reshape(c, -1), precision=precision, preferred_element_type=out_dtype)
    return y.reshape(n, h, wd, -1)


def _depthwise_forward(x, w, stride, padding, dilation, out_dtype):
    kh, kw = w.shape[:2]
    n, h, wd, c = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    xp = jnp.pad(x, ((0, 0), (padding[0],) * 2, (padding[1],) * 2, (0, 0)))
    dt = jnp.dtype(out_dtype) if out_dtype is not None else x.dtype
    y = None
    for a in range(kh):
        for b in range(kw):
            r0, c0 = a * dilation[0], b * dilation[1]
            xs = jax.lax.slice(xp, (0, r0, c0, 0), (n, r0 + (ho - 1) * stride[0] + 1, c0 + (wo - 1) * stride[1] + 1, c),
                               (1, *stride, 1))
            term = xs.astype(dt) * w[a, b, 0].astype(dt)
            y = term if y is None else y + term
    return y


def depthwise_taps(x, w, stride, padding, dilation, precision, out_dtype):
    """Fast path ``depthwise_taps``: a depthwise convolution (groups = channels, one filter per channel: RTMDet's
    5x5 CSPNeXt blocks) as kh * kw shifted multiply-adds, which XLA fuses into one loop; XLA:CPU's grouped
    convolution runs these several times slower. Same sums in another order (float32 rounding). Stride 1 (all of
    RTMDet's) takes its gradients from :func:`_depthwise_bwd`; other strides are differentiated by JAX."""
    if tuple(stride) == (1, 1):
        return _depthwise_s1(x, w, tuple(padding), tuple(dilation), out_dtype)
    return _depthwise_forward(x, w, stride, padding, dilation, out_dtype)


DW_BLOCK_ROWS = 4  # output rows per step of the weight gradient's loop (4 and 8 measured alike; 16 slower)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_s1(x, w, padding, dilation, out_dtype):
    return _depthwise_forward(x, w, (1, 1), padding, dilation, out_dtype)


def _depthwise_fwd(x, w, padding, dilation, out_dtype):
    return _depthwise_s1(x, w, padding, dilation, out_dtype), (x, w)


def _depthwise_bwd(padding, dilation, out_dtype, res, g):
    """Input gradient: JAX's transpose of the taps (each input pixel gathers kh * kw shifted output gradients, one
    fused loop). Weight gradient: ``dw[a, b, c] = sum over n, i, j of xp[n, i + a*dh, j + b*dw, c] * g[n, i, j,
    c]``, accumulated over blocks of :data:`DW_BLOCK_ROWS` output rows of one image, so that each block's input
    rows are read from cache by all kh * kw products. JAX's own transpose keeps the kh * kw shifted copies of the
    input for the backward and reduces each against the gradient from memory (RTMDet-s's 5x5 blocks, batch 8 at
    640 x 640: ~0.9 s of copies in the train step, each product ~7 ms at 160 x 160 x 32); blocked, the weight
    gradient of that 8 x 160 x 160 x 32 block takes ~27 ms instead of ~175 ms."""
    x, w = res
    kh, kw = w.shape[:2]
    (ph, pw), (dh, dw) = padding, dilation
    _, vjp_x = jax.vjp(lambda v: _depthwise_forward(v, w, (1, 1), padding, dilation, out_dtype), x)
    (gx,) = vjp_x(g)
    n, ho, wo, c = g.shape
    rows = DW_BLOCK_ROWS
    blocks = -(-ho // rows)
    extra = blocks * rows - ho  # zero gradient rows: add nothing
    acc_dt = jnp.promote_types(g.dtype, jnp.float32)
    xp = jnp.pad(x, ((0, 0), (ph, ph + extra), (pw, pw), (0, 0))).astype(acc_dt)
    gp = jnp.pad(g, ((0, 0), (0, extra), (0, 0), (0, 0))).astype(acc_dt)
    span = rows + (kh - 1) * dh

    def block(i, acc):
        img, r = i // blocks, (i % blocks) * rows
        xb = jax.lax.dynamic_slice(xp, (img, r, 0, 0), (1, span, xp.shape[2], c))[0]
        gb = jax.lax.dynamic_slice(gp, (img, r, 0, 0), (1, rows, wo, c))[0]
        taps = [[jnp.sum(xb[a * dh:a * dh + rows, b * dw:b * dw + wo] * gb, axis=(0, 1)) for b in range(kw)]
                for a in range(kh)]
        return acc + jnp.stack([jnp.stack(t) for t in taps])

    gw = jax.lax.fori_loop(0, n * blocks, block, jnp.zeros((kh, kw, c), acc_dt))
    return gx.astype(x.dtype), gw[:, :, None, :].astype(w.dtype)


_depthwise_s1.defvjp(_depthwise_fwd, _depthwise_bwd)
