"""The plain convolution: torch's Conv2d arithmetic on NHWC x HWIO, by ``lax.conv_general_dilated``.

XLA differentiates it itself. Hand-written alternatives (matmul / phase gradients, 1x1 as a matmul) are
in :mod:`flaxdet.fast_paths.conv`, chosen by :func:`flaxdet.nn.conv2d`.
"""
from __future__ import annotations

import jax


def conv2d(x, w, stride, padding, dilation, groups, precision, out_dtype):
    """Symmetric ``padding`` (per axis), ``dilation`` on the kernel, ``groups``; ``out_dtype`` the
    accumulation/result dtype (None: the inputs')."""
    return jax.lax.conv_general_dilated(
        x, w, window_strides=stride, padding=[(p, p) for p in padding], rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=precision, preferred_element_type=out_dtype)
