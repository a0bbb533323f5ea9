"""The ``max_pool_taps`` fast path against the plain ``reduce_window`` pool and torch's MaxPool2d: bit-identical
values, the same gradient routing (ties included: the first maximum of a window in row-major order gets it, as
torch's). With integer cotangents the gradients are sums of integers, exact in any order, so they must be equal
bit for bit; with random ones they differ only by the order in which overlapping windows' gradients add up."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxdet import fast_paths, nn

CASES = [(5, 1, 2), (9, 1, 4), (13, 1, 6), (3, 2, 1), (2, 2, 0), (3, 1, 0)]  # (kernel, stride, padding)


def _pool_and_grad(x, k, s, p, spec, integer):
    with fast_paths.use(spec):
        f = jax.jit(lambda v: nn.max_pool2d(v, k, s, p))
        rng = np.random.default_rng(1)
        shape = f(x).shape
        cot = rng.integers(-8, 9, shape) if integer else rng.standard_normal(shape)
        cot = jnp.asarray(cot.astype(np.float32))
        y, vjp = jax.vjp(f, x)
        jaxpr = str(jax.make_jaxpr(lambda v: nn.max_pool2d(v, k, s, p))(x))
        return np.asarray(y), np.asarray(vjp(cot)[0]), np.asarray(cot), "reduce_window_max" in jaxpr


@pytest.mark.parametrize("integer", [True, False], ids=["int-cotangent", "float-cotangent"])
@pytest.mark.parametrize("k,s,p", CASES)
def test_max_pool_taps_equal_plain_and_torch(k, s, p, integer):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 13, 11, 6)).astype(np.float32)
    x[1, :, 5:] = 0.25  # a constant region (padded images): ties in every window there
    y_fast, g_fast, cot, plain_in_fwd = _pool_and_grad(jnp.asarray(x), k, s, p, "all", integer)
    y_plain, g_plain, _, plain_used = _pool_and_grad(jnp.asarray(x), k, s, p, "none", integer)
    assert plain_used and not plain_in_fwd  # each spec took its own path
    np.testing.assert_array_equal(y_fast, y_plain)
    check = np.testing.assert_array_equal if integer else (
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max()))  # scale-relative
    check(g_fast, g_plain)

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p)
    yt.backward(torch.from_numpy(cot.copy()).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(y_fast, yt.detach().permute(0, 2, 3, 1).numpy())
    check(g_fast, xt.grad.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("k,s,p", CASES)
def test_max_pool_taps_nan_like_torch(k, s, p):
    """A NaN is its windows' maximum, and gets their gradient, as in torch. (The plain pool's select-and-scatter
    never selects a NaN: its gradient goes elsewhere; the values agree.)"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 13, 11, 6)).astype(np.float32)
    x[1, :, 5:] = 0.25
    x[0, 4, 3, 2] = x[1, 6, 8, 0] = np.nan
    y, g, cot, _ = _pool_and_grad(jnp.asarray(x), k, s, p, "all", True)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p)
    yt.backward(torch.from_numpy(cot.copy()).permute(0, 3, 1, 2))
    assert np.isnan(y).any()
    np.testing.assert_array_equal(y, yt.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(g, xt.grad.permute(0, 2, 3, 1).numpy())
