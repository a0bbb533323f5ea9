"""torch-named Flax NNX layers: the leaves carry torch's names, only the layout differs.

Every layer keeps torch's attribute names for its variables (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so a visdet key such as
``roi_head.bbox_head.shared_fcs.0.weight`` *is* the Flax path ``roi_head/bbox_head/shared_fcs/0/weight``.
What differs is the memory layout (flaxdet is NHWC), declared per layer class in
``TORCH_LAYOUT``: ``{leaf: permutation}`` with ``flax = torch.transpose(permutation)``. The
converter uses only these two facts -- the path and the owning layer's class -- never a table
of model keys.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet.ops import exact_div  # noqa: F401  (re-exported: layers use it)

PRECISION = jax.lax.Precision.HIGHEST  # float32 parity: no reduced-precision passes on accelerators

# Compute-dtype policy (mixed precision). Parameters always stay float32. A layer whose
# ``compute_dtype`` is set (Conv2d, ConvTranspose2d, Linear: the convolutions and matmuls) casts its
# input and weight to that dtype and accumulates and returns float32 (``preferred_element_type``);
# everything between them -- BatchNorm, ReLU, residual adds, softmax/sigmoid, box decoding, NMS,
# RoIAlign (features and sampling coordinates), mask pasting and every loss -- therefore runs in
# float32. XLA fuses each float32 elementwise chain into the cast that feeds the next bf16 op, so the
# float32 intermediates are rarely materialised. Default ``None``: float32 end to end (parity).
COMPUTE_DTYPES = {"float32": None, "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _compute(x, w, compute_dtype):
    """(x, w, precision, preferred_element_type) for a layer's conv/matmul under the policy."""
    if compute_dtype is None:
        return x, w.astype(x.dtype), PRECISION, None
    dt = jnp.dtype(compute_dtype)
    return x.astype(dt), w.astype(dt), jax.lax.Precision.DEFAULT, jnp.float32


def set_compute_dtype(module, dtype):
    """Set the compute dtype of every Conv2d / ConvTranspose2d / Linear in ``module`` (in place).
    ``dtype``: None / "float32" (float32 everywhere, the parity default) or "bfloat16". Returns the
    number of layers set. The dtype is a static attribute: jitted functions of the model's graphdef
    recompile for it (``Detector`` and ``TrainState`` split the model after setting it)."""
    key = dtype if dtype is None or isinstance(dtype, str) else jnp.dtype(dtype).name
    if key is not None and key not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES)} (got {dtype!r})")
    value = None if key is None else COMPUTE_DTYPES[key]
    n = 0
    for _, m in nnx.iter_modules(module):
        if isinstance(m, (Conv2d, ConvTranspose2d, Linear)):
            m.compute_dtype = value
            n += 1
    return n


class Counter(nnx.Variable):
    """Integer bookkeeping state (BatchNorm's ``num_batches_tracked``): carried, never trained."""


def _uniform(key, shape, bound, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv_xla(x, w, stride, padding, dilation, groups, precision, out_dtype):
    return jax.lax.conv_general_dilated(
        x, w, window_strides=stride, padding=[(p, p) for p in padding], rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=precision, preferred_element_type=out_dtype)


def _matmul_weight_grad(w, groups):
    """Whether the weight gradient of a conv with weight ``w`` (kh, kw, in, out) is computed as
    shifted matmuls (``_conv_bwd``) rather than by XLA's transposed convolution. XLA:CPU's weight
    gradient treats the batch x space extent as a convolution window, slow for 1x1 kernels and wide
    channels; measured on a 2-core EPYC (ms, XLA / matmuls): 1x1 256->512 stride 2 at 120x160 b2
    243 / 19, 1x1 256->64 109 / 16, 3x3 256 at 120x160 b2 718 / 404, 3x3 256 on 256 RoIs of 14x14
    1961 / 562, 3x3 512 at 15x20 20 / 19; but 3x3 with 64 or 128 input channels 36 / 78, 17 / 36."""
    kh, kw, cin, _ = w.shape
    return groups == 1 and (kh * kw == 1 or cin >= 256)


def _custom_vjp(w, stride, dilation, groups):
    """Whether ``conv2d`` takes its gradients from :func:`_conv_bwd`: a matmul weight gradient
    (:func:`_matmul_weight_grad`), or a strided kernel whose input gradient is cheaper by phases
    (:func:`_phase_input_grad`) than by XLA's zero-dilated transposed convolution."""
    strided = groups == 1 and dilation == (1, 1) and stride != (1, 1) and w.shape[:2] != (1, 1)
    return _matmul_weight_grad(w, groups) or strided


def _phase_input_grad(gy, w, in_hw, stride, padding, precision, out_dtype):
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
            cols.append(jax.lax.conv_general_dilated(gy, sub, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                     precision=precision, preferred_element_type=out_dtype))
        rows.append(jnp.stack(cols, 3))  # (n, u0, u1, sw, cin)
    g = jnp.stack(rows, 2).reshape(n, u0 * sh, u1 * sw, cin)
    return g[:, ph:ph + in_hw[0], pw:pw + in_hw[1]]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv_mm(x, w, stride, padding, dilation, groups, precision, out_dtype):
    return _conv_xla(x, w, stride, padding, dilation, groups, precision, out_dtype)


def _conv_fwd(x, w, stride, padding, dilation, groups, precision, out_dtype):
    return _conv_xla(x, w, stride, padding, dilation, groups, precision, out_dtype), (x, w)


def _conv_bwd(stride, padding, dilation, groups, precision, out_dtype, res, gy):
    """Input gradient: at stride 1 a flipped-kernel convolution, strided (dilation 1) by phases
    (:func:`_phase_input_grad`), else XLA's transpose. Weight gradient, where
    :func:`_matmul_weight_grad` says so, per kernel tap (a, b):
    ``gw[a, b] = sum_{n,i,j} x_pad[n, s*i + d*a, s*j + d*b, :]^T gy[n, i, j, :]`` -- one matmul
    over all N*Ho*Wo output positions (at least float32 accumulation; products in the compute dtype);
    else XLA's transpose."""
    x, w = res
    kh, kw, cin, cout = w.shape
    back = [d * (k - 1) - p for d, k, p in zip(dilation, (kh, kw), padding)]
    if stride == (1, 1) and min(back) >= 0 and groups == 1:
        # stride 1: the input gradient is a forward convolution of gy with the flipped, in/out-swapped
        # kernel. XLA's own transpose is a different convolution that XLA:CPU runs without its fast
        # kernels inside lax.switch branches (the training mask branch): measured 2.2x slower there.
        wf = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
        gx = _conv_xla(gy.astype(x.dtype), wf, (1, 1), back, dilation, 1, precision, out_dtype).astype(x.dtype)
    elif groups == 1 and dilation == (1, 1):
        gx = _phase_input_grad(gy.astype(x.dtype), w, x.shape[1:3], stride, padding, precision,
                               out_dtype).astype(x.dtype)
    else:
        gx = jax.vjp(lambda v: _conv_xla(v, w, stride, padding, dilation, groups, precision, out_dtype), x)[1](gy)[0]
    if not _matmul_weight_grad(w, groups):
        return gx, jax.vjp(lambda v: _conv_xla(x, v, stride, padding, dilation, groups, precision, out_dtype),
                           w)[1](gy)[0]
    n, ho, wo, _ = gy.shape
    xp = jnp.pad(x, ((0, 0), (padding[0],) * 2, (padding[1],) * 2, (0, 0)))
    g2 = gy.astype(x.dtype).reshape(-1, cout)
    taps = []
    for a in range(kh):
        for b in range(kw):
            r0, c0 = a * dilation[0], b * dilation[1]
            xs = jax.lax.slice(xp, (0, r0, c0, 0), (n, r0 + (ho - 1) * stride[0] + 1, c0 + (wo - 1) * stride[1] + 1,
                                                    cin), (1, *stride, 1))
            taps.append(jnp.matmul(xs.reshape(-1, cin).T, g2, precision=precision,
                                   preferred_element_type=jnp.promote_types(x.dtype, jnp.float32)))
    return gx, jnp.stack(taps).reshape(w.shape).astype(w.dtype)


_conv_mm.defvjp(_conv_fwd, _conv_bwd)


def _conv1x1(x, w, stride, precision, out_dtype):
    """An unpadded 1x1 convolution as one matmul over the (strided) pixels. XLA:CPU runs it 1.2-4x
    faster than the same convolution (measured on a 2-core EPYC, ms, conv / matmul, one 200x336 map:
    256->1024 340 / 309, 1024->256 568 / 227, 256->64 51 / 13, 64->256 57 / 37), and its gradients are
    matmuls too (no transposed convolution)."""
    if stride != (1, 1):
        x = x[:, ::stride[0], ::stride[1], :]
    n, h, wd, c = x.shape
    y = jnp.matmul(x.reshape(n * h * wd, c), w.reshape(c, -1), precision=precision, preferred_element_type=out_dtype)
    return y.reshape(n, h, wd, -1)


def conv2d(x, w, stride, padding, dilation, groups, precision, out_dtype):
    """NHWC x HWIO convolution (torch's Conv2d arithmetic: symmetric ``padding``, ``dilation`` on the
    kernel, ``groups``). Unpadded 1x1 kernels run as a matmul (:func:`_conv1x1`); other kernels take
    their weight gradient by shifted matmuls where that is faster on XLA:CPU
    (:func:`_matmul_weight_grad`). Reverse-mode only on that path (a custom VJP)."""
    args = (tuple(stride), tuple(padding), tuple(dilation), groups, precision, out_dtype)
    if w.shape[:2] == (1, 1) and groups == 1 and tuple(padding) == (0, 0):
        return _conv1x1(x, w, tuple(stride), precision, out_dtype)
    if _custom_vjp(w, tuple(stride), tuple(dilation), groups):
        return _conv_mm(x, w, *args)
    return _conv_xla(x, w, *args)


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC. weight (kh, kw, in/groups, out) = torch (out, in/groups, kh, kw)."""

    TORCH_LAYOUT = {"weight": (2, 3, 1, 0)}
    compute_dtype = None  # see set_compute_dtype

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, rngs: nnx.Rngs):
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        self.groups = groups
        fan_in = in_channels // groups * k[0] * k[1]
        bound = 1 / math.sqrt(fan_in)  # torch's default init (kaiming_uniform a=sqrt(5))
        self.weight = nnx.Param(_uniform(rngs.params(), (*k, in_channels // groups, out_channels), bound))
        self.bias = nnx.Param(_uniform(rngs.params(), (out_channels,), bound)) if bias else None

    def __call__(self, x):
        x, w, precision, out_dtype = _compute(x, self.weight[...], self.compute_dtype)
        y = conv2d(x, w, self.stride, self.padding, self.dilation, self.groups, precision, out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class ConvTranspose2d(nnx.Module):
    """torch.nn.ConvTranspose2d with kernel_size == stride (no overlap), as FCNMaskHead's upsample:
    out[n, s*i+a, s*j+b, o] = bias[o] + sum_c x[n,i,j,c] * W[c,o,a,b]. weight (kh, kw, in, out)."""

    TORCH_LAYOUT = {"weight": (2, 3, 0, 1)}
    compute_dtype = None  # see set_compute_dtype

    def __init__(self, in_channels, out_channels, kernel_size, stride, bias=True, *, rngs: nnx.Rngs):
        if kernel_size != stride:
            raise ValueError("ConvTranspose2d: only kernel_size == stride (non-overlapping) is supported")
        self.kernel_size = self.stride = stride
        bound = 1 / math.sqrt(out_channels * kernel_size * kernel_size)
        self.weight = nnx.Param(_uniform(rngs.params(), (stride, stride, in_channels, out_channels), bound))
        self.bias = nnx.Param(_uniform(rngs.params(), (out_channels,), bound)) if bias else None

    def __call__(self, x):
        n, h, w, _ = x.shape
        s = self.stride
        x, kernel, precision, out_dtype = _compute(x, self.weight[...], self.compute_dtype)
        y = jnp.einsum("nijc,abco->niajbo", x, kernel, precision=precision, preferred_element_type=out_dtype)
        y = y.reshape(n, h * s, w * s, -1)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Linear(nnx.Module):
    """torch.nn.Linear. weight (in, out) = torch (out, in)."""

    TORCH_LAYOUT = {"weight": (1, 0)}
    compute_dtype = None  # see set_compute_dtype

    def __init__(self, in_features, out_features, bias=True, *, rngs: nnx.Rngs):
        bound = 1 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nnx.Param(_uniform(rngs.params(), (in_features, out_features), bound))
        self.bias = nnx.Param(_uniform(rngs.params(), (out_features,), bound)) if bias else None

    def __call__(self, x):
        x, w, precision, out_dtype = _compute(x, self.weight[...], self.compute_dtype)
        y = jnp.matmul(x, w, precision=precision, preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d over the last axis. visdet runs every BN in eval mode (norm_eval=True),
    in training too: y = x * alpha + beta with alpha = weight / sqrt(var + eps) (torch's CPU form)."""

    TORCH_LAYOUT: dict = {}

    def __init__(self, num_features, eps=1e-5, momentum=0.1, *, rngs: nnx.Rngs | None = None):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        invstd = jax.lax.rsqrt(self.running_var[...] + self.eps)
        alpha = invstd * self.weight[...]
        beta = self.bias[...] - self.running_mean[...] * alpha
        return x * alpha.astype(x.dtype) + beta.astype(x.dtype)


class GroupNorm(nnx.Module):
    TORCH_LAYOUT: dict = {}

    def __init__(self, num_groups, num_channels, eps=1e-5, *, rngs: nnx.Rngs | None = None):
        self.num_groups, self.eps = num_groups, eps
        self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

    def __call__(self, x):
        shape = x.shape
        g = x.reshape(*shape[:-1], self.num_groups, shape[-1] // self.num_groups)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = g.mean(axes, keepdims=True)
        var = ((g - mean) ** 2).mean(axes, keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        return g.reshape(shape) * self.weight[...] + self.bias[...]


class LayerNorm(nnx.Module):
    TORCH_LAYOUT: dict = {}

    def __init__(self, normalized_shape, eps=1e-5, *, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((normalized_shape,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((normalized_shape,), jnp.float32))

    def __call__(self, x):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


class Sequential(nnx.List):
    """torch.nn.Sequential: children at integer indices (keys ``downsample.0``, ``layer1.0`` ...)."""

    def __init__(self, *layers):
        super().__init__(list(layers))

    def __call__(self, x):
        for layer in self:
            x = layer(x)
        return x


def relu(x):
    return jnp.maximum(x, 0)


def max_pool2d(x, kernel_size, stride, padding=0):
    """torch.nn.MaxPool2d on NHWC (implicit -inf padding)."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1), (1, stride, stride, 1),
        [(0, 0), (padding, padding), (padding, padding), (0, 0)])


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """torch F.interpolate(mode='nearest', size=...) source indices (static)."""
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def interpolate_nearest(x, size):
    """F.interpolate(x, size=(h, w), mode='nearest') on NHWC with static sizes."""
    h, w = size
    x = jnp.take(x, nearest_indices(x.shape[1], h), axis=1)
    return jnp.take(x, nearest_indices(x.shape[2], w), axis=2)
