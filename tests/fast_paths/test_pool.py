"""The ``max_pool_taps`` fast path against the plain ``reduce_window`` pool and torch's MaxPool2d: bit-identical
values, the same gradient (ties included: the first maximum of a window gets it, as torch's)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxdet import fast_paths, nn

CASES = [(5, 1, 2), (9, 1, 4), (13, 1, 6), (3, 2, 1), (2, 2, 0), (3, 1, 0)]  # (kernel, stride, padding)


def _pool_and_grad(x, k, s, p, spec):
    with fast_paths.use(spec):
        f = jax.jit(lambda v: nn.max_pool2d(v, k, s, p))
        cot = jnp.asarray(np.random.default_rng(1).standard_normal(f(x).shape).astype(np.float32))
        y, vjp = jax.vjp(f, x)
        jaxpr = str(jax.make_jaxpr(lambda v: nn.max_pool2d(v, k, s, p))(x))
        return np.asarray(y), np.asarray(vjp(cot)[0]), np.asarray(cot), "reduce_window_max" in jaxpr


@pytest.mark.parametrize("k,s,p", CASES)
def test_max_pool_taps_equal_plain_and_torch(k, s, p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 13, 11, 6)).astype(np.float32)
    x[1, :, 5:] = 0.25  # a constant region (padded images): ties in every window there
    y_fast, g_fast, cot, plain_in_fwd = _pool_and_grad(jnp.asarray(x), k, s, p, "all")
    y_plain, g_plain, _, plain_used = _pool_and_grad(jnp.asarray(x), k, s, p, "none")
    assert plain_used and not plain_in_fwd  # each spec took its own path
    np.testing.assert_array_equal(y_fast, y_plain)
    np.testing.assert_array_equal(g_fast, g_plain)

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p)
    yt.backward(torch.from_numpy(cot.copy()).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(y_fast, yt.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(g_fast, xt.grad.permute(0, 2, 3, 1).numpy())
