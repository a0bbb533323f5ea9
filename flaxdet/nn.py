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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet import fast_paths
from flaxdet.fast_paths import conv as fast_conv
from flaxdet.fast_paths import pool as fast_pool
from flaxdet.ops import exact_div  # noqa: F401  (re-exported: layers use it)
from flaxdet.ops.conv import conv2d as plain_conv2d

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


def conv2d(x, w, stride, padding, dilation, groups, precision, out_dtype):
    """NHWC x HWIO convolution with torch's Conv2d arithmetic (symmetric ``padding``, ``dilation`` on the
    kernel, ``groups``): :func:`flaxdet.ops.conv.conv2d`, or where the ``conv1x1_matmul`` / ``conv_vjp`` /
    ``onednn_conv`` fast paths are on (:mod:`flaxdet.fast_paths`; CPU by default) an unpadded 1x1 kernel as a
    matmul, hand-written gradients for the kernels :func:`flaxdet.fast_paths.conv.wants_custom_vjp` selects,
    and the forward convolution by oneDNN (:mod:`flaxdet.fast_paths.onednn`, where its library is built)."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if (w.shape[:2] == (1, 1) and groups == 1 and padding == (0, 0)
            and fast_paths.enabled("conv1x1_matmul")):
        return fast_conv.conv1x1(x, w, stride, precision, out_dtype)
    if (groups > 1 and groups == x.shape[-1] == w.shape[-1] and w.shape[2] == 1
            and fast_paths.enabled("depthwise_taps")):
        return fast_conv.depthwise_taps(x, w, stride, padding, dilation, precision, out_dtype)
    if fast_paths.enabled("conv_vjp") and fast_conv.wants_custom_vjp(w, stride, dilation, groups):
        return fast_conv.conv_vjp(x, w, stride, padding, dilation, groups, precision, out_dtype)
    if fast_paths.enabled("onednn_conv"):
        return fast_conv.forward(x, w, stride, padding, dilation, groups, precision, out_dtype)
    return plain_conv2d(x, w, stride, padding, dilation, groups, precision, out_dtype)


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
    """torch.nn.BatchNorm2d over the last axis, y = x * alpha + beta with alpha = weight / sqrt(var + eps) (torch's
    CPU form).

    ``use_running_average`` (default True, a static attribute set by ``nnx.Module.train()`` / ``eval()`` or
    :func:`set_bn_training`): the running statistics, as visdet's two-stage family always runs its BN
    (``norm_eval=True``, in training too). False: torch's train mode -- the batch's mean and biased variance over
    (N, H, W) normalise, and the running statistics move by ``momentum`` towards the mean and the *unbiased*
    variance (``n / (n - 1)``); ``num_batches_tracked`` counts. Under ``jit`` with the batch sharded over a
    ``data`` mesh axis the means are over the global batch: SyncBN's statistics."""

    TORCH_LAYOUT: dict = {}

    def __init__(self, num_features, eps=1e-5, momentum=0.1, *, rngs: nnx.Rngs | None = None):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.use_running_average = True
        self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            m, sg = self.momentum, jax.lax.stop_gradient
            self.running_mean[...] = (1 - m) * self.running_mean[...] + m * sg(mean)
            self.running_var[...] = (1 - m) * self.running_var[...] + m * sg(var) * (n / max(n - 1, 1))
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        invstd = jax.lax.rsqrt(var + self.eps)
        alpha = invstd * self.weight[...]
        beta = self.bias[...] - mean * alpha
        return x * alpha.astype(x.dtype) + beta.astype(x.dtype)


def set_bn_training(module, training: bool, skip=()):
    """Put every :class:`BatchNorm2d` under ``module`` in train (batch statistics) or eval mode, except those
    whose dotted path starts with one of ``skip`` (e.g. a ``norm_eval`` backbone). Returns how many changed."""
    n = 0
    for path, m in nnx.iter_graph(module):
        if isinstance(m, BatchNorm2d):
            dotted = ".".join(str(p) for p in path)
            if any(dotted == s or dotted.startswith(s + ".") for s in skip):
                continue
            if m.use_running_average == training:
                n += 1
            m.use_running_average = not training
    return n


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
    """max(x, 0) with torch's gradient at 0 (zero; ``jnp.maximum`` would split it 0.5 / 0.5 -- visible where a
    whole map is 0, e.g. RTMDet-Ins dynamic convs on padding)."""
    return jax.nn.relu(x)


def max_pool2d(x, kernel_size, stride, padding=0):
    """torch.nn.MaxPool2d on NHWC (implicit -inf padding): one ``reduce_window``, or where the ``max_pool_taps``
    fast path is on (:mod:`flaxdet.fast_paths`; CPU by default) shifted maxima per axis, bit-identical, with the
    same gradient."""
    if fast_paths.enabled("max_pool_taps"):
        return fast_pool.max_pool_taps(x, kernel_size, stride, padding)
    return fast_pool.plain_max_pool2d(x, kernel_size, stride, padding)


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
