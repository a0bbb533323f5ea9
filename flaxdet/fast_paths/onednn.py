"""Fast path ``onednn_conv`` (see :mod:`flaxdet.fast_paths`): forward convolutions by oneDNN, called from the
jitted program through the XLA FFI.

XLA:CPU's own convolutions reach 400-500 GFLOP/s in float32 on the 2-core AMD EPYC the benchmarks run on, and
bfloat16 operands make them no faster (measured), while the same machine multiplies bf16 matrices at
~900 GFLOP/s. oneDNN -- the library PyTorch's CPU convolutions use -- runs the same convolutions at ~470-560
GFLOP/s in float32 and ~860-1090 GFLOP/s in bfloat16 (3x3, 64-512 channels, 14x14 to 200x336; medians of 5).

:func:`conv` is an NHWC x HWIO convolution (groups 1, paddings >= 0), float32 or bfloat16 inputs, float32
result: oneDNN's forward convolution as an ``ffi_call`` to ``native/libflaxdet_onednn.so``
(``native/onednn_conv.cc``, built by ``make native`` against the system's oneDNN, Debian's ``libdnnl-dev``).
Its reverse-mode gradient is XLA's (the plain convolution's VJP); inside :func:`flaxdet.fast_paths.conv.conv_vjp`
the hand-written gradients apply and their stride-1 input gradients are oneDNN forward convolutions too.

Plain path: :func:`flaxdet.ops.conv.conv2d`. Without the library (not built, or oneDNN missing) the fast path is
unavailable and the plain path runs; :func:`available` says which, :func:`unavailable_reason` why. Programs that
leave the process (``flaxdet export``) are traced without it: the call names a target that only this library
registers.
"""
from __future__ import annotations

import ctypes
import threading
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = Path(__file__).with_name("native") / "libflaxdet_onednn.so"
TARGETS = {jnp.dtype(jnp.float32): "flaxdet_onednn_conv_f32", jnp.dtype(jnp.bfloat16): "flaxdet_onednn_conv_bf16"}

_lock = threading.Lock()
_state: dict = {}


def _load():
    """Load the library and register its FFI targets once; returns (ok, reason)."""
    with _lock:
        if "ok" not in _state:
            try:
                if not LIBRARY.is_file():
                    raise OSError(f"{LIBRARY} is not built (run `make native`; needs g++ and oneDNN: libdnnl-dev)")
                lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
                jax.ffi.register_ffi_target(TARGETS[jnp.dtype(jnp.float32)],
                                            jax.ffi.pycapsule(lib.FlaxdetOnednnConvF32), platform="cpu")
                jax.ffi.register_ffi_target(TARGETS[jnp.dtype(jnp.bfloat16)],
                                            jax.ffi.pycapsule(lib.FlaxdetOnednnConvBf16), platform="cpu")
                v = lib.flaxdet_onednn_version()
                _state.update(ok=True, reason=None, version=f"{v // 10000}.{v // 100 % 100}.{v % 100}")
            except (OSError, AttributeError) as e:
                _state.update(ok=False, reason=str(e), version=None)
        return _state["ok"], _state["reason"]


def available() -> bool:
    """Whether the oneDNN library is built and loads (its FFI targets registered)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()[1]


def version() -> str | None:
    """The oneDNN version the library was built against, e.g. ``"2.6.3"`` (None when unavailable)."""
    _load()
    return _state.get("version")


def note_if_missing(log=print) -> bool:
    """On CPU with the fast path on but its library missing, ``log`` one line saying so and how to build it (the
    commands that run models call this once). Returns whether it logged."""
    from flaxdet import fast_paths

    if jax.default_backend() != "cpu" or not fast_paths.enabled("onednn_conv") or available():
        return False
    log(f"note: convolutions run on XLA, not oneDNN ({unavailable_reason()}); float32 up to ~15% and bf16 about "
        "1.5x slower")
    return True


def supports(x, w, stride, padding, dilation, groups, out_dtype) -> bool:
    """Whether :func:`conv` computes this convolution: 4-D float32 or bfloat16 operands of one dtype, groups 1,
    paddings >= 0, a float32 result (``out_dtype`` None with float32 inputs, or float32), the CPU backend and the
    library available. ``padding``: per axis a symmetric int or a (low, high) pair."""
    dt = jnp.dtype(x.dtype)
    if dt not in TARGETS or jnp.dtype(w.dtype) != dt or x.ndim != 4 or w.ndim != 4 or groups != 1:
        return False
    if (out_dtype is None and dt != jnp.float32) or (out_dtype is not None and jnp.dtype(out_dtype) != jnp.float32):
        return False
    (top, bottom), (left, right) = pad_pairs(padding)
    if min(top, bottom, left, right) < 0 or min(stride) < 1 or min(dilation) < 1:
        return False
    return jax.default_backend() == "cpu" and available()


def pad_pairs(padding):
    """Per axis ``(low, high)`` from an int (symmetric) or a pair."""
    ph, pw = ((p, p) if isinstance(p, int | np.integer) else tuple(p) for p in padding)
    return ph, pw


def _ffi_conv(x, w, stride, padding, dilation):
    (top, bottom), (left, right) = pad_pairs(padding)
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    call = jax.ffi.ffi_call(TARGETS[jnp.dtype(x.dtype)], jax.ShapeDtypeStruct((n, oh, ow, o), jnp.float32),
                            vmap_method="sequential")
    i64 = np.int64
    return call(x, w, sh=i64(stride[0]), sw=i64(stride[1]), top=i64(top), bottom=i64(bottom), left=i64(left),
                right=i64(right), dh=i64(dilation[0]), dw=i64(dilation[1]))


def plain(x, w, stride, padding, dilation, precision, out_dtype, groups=1):
    """XLA's convolution with the same arguments as :func:`conv` (``padding`` per axis an int or a (low, high)
    pair), and ``groups``."""
    return jax.lax.conv_general_dilated(x, w, window_strides=tuple(stride), padding=pad_pairs(padding),
                                        rhs_dilation=tuple(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups, precision=precision,
                                        preferred_element_type=out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv(x, w, stride, padding, dilation, precision=None, out_dtype=None):
    """oneDNN's convolution (see :func:`supports` for what it takes); float32 result. Differentiable in reverse
    mode: the gradients are those of :func:`plain` (XLA's)."""
    return _ffi_conv(x, w, tuple(stride), tuple(padding), tuple(dilation))


def _conv_fwd(x, w, stride, padding, dilation, precision, out_dtype):
    return conv(x, w, stride, padding, dilation, precision, out_dtype), (x, w)


def _conv_bwd(stride, padding, dilation, precision, out_dtype, res, gy):
    x, w = res
    return jax.vjp(lambda a, b: plain(a, b, stride, padding, dilation, precision, out_dtype), x, w)[1](gy)


conv.defvjp(_conv_fwd, _conv_bwd)


__all__ = ["LIBRARY", "available", "conv", "note_if_missing", "plain", "supports", "unavailable_reason", "version"]
