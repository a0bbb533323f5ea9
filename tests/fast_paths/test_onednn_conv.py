"""Fast path ``onednn_conv``: oneDNN's forward convolution through the XLA FFI equals XLA's convolution (float32;
bfloat16 inputs with float32 results), under jit, in loops and under vmap, and its gradients are the plain ones.

The library is built by ``make native`` (``make test`` builds it first). Where it is not built these tests skip,
unless FLAXDET_REQUIRE_NATIVE=1 (CI sets it): then they fail."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdet import fast_paths, nn
from flaxdet.fast_paths import onednn

if not onednn.available():
    if os.environ.get("FLAXDET_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"FLAXDET_REQUIRE_NATIVE=1 but {onednn.unavailable_reason()}")
    pytest.skip(f"onednn_conv unavailable: {onednn.unavailable_reason()}", allow_module_level=True)

# (N, H, W, C), (KH, KW, O), stride, padding (per axis: int or (low, high)), dilation
CASES = [
    ((2, 17, 23, 8), (3, 3, 16), (1, 1), (1, 1), (1, 1)),
    ((1, 20, 31, 5), (3, 3, 7), (2, 2), (1, 1), (1, 1)),
    ((1, 33, 21, 3), (7, 7, 8), (2, 2), (3, 3), (1, 1)),  # a ResNet stem
    ((2, 12, 14, 16), (3, 3, 16), (1, 1), (2, 2), (2, 2)),  # dilated
    ((1, 9, 10, 6), (1, 1, 4), (2, 1), (0, 0), (1, 1)),
    ((1, 11, 13, 4), (3, 2, 5), (1, 2), ((2, 0), (0, 1)), (1, 1)),  # asymmetric padding, non-square kernel
]


def _operands(case, dtype, seed=0):
    (n, h, w, c), (kh, kw, o) = case[:2]
    kx, kw_ = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, h, w, c), jnp.float32)
    wt = jax.random.normal(kw_, (kh, kw, c, o), jnp.float32) / np.sqrt(kh * kw * c)
    return x.astype(dtype), wt.astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_forward_equals_xla(case, dtype):
    x, w = _operands(case, jnp.dtype(dtype))
    stride, padding, dilation = case[2:]
    out_dtype = None if dtype == "float32" else jnp.float32
    assert onednn.supports(x, w, stride, padding, dilation, 1, out_dtype)
    got = jax.jit(lambda a, b: onednn.conv(a, b, stride, padding, dilation, None, out_dtype))(x, w)
    want = onednn.plain(x.astype(jnp.float32), w.astype(jnp.float32), stride, padding, dilation,
                        jax.lax.Precision.HIGHEST, None)
    assert got.shape == want.shape and got.dtype == jnp.float32
    # bf16 inputs: the products are exact in float32 on both sides; only the summation order differs
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


def test_what_it_takes():
    x, w = _operands(CASES[0], jnp.float32)
    assert not onednn.supports(x, w, (1, 1), (1, 1), (1, 1), 2, None)  # groups
    assert not onednn.supports(x, w, (1, 1), ((-1, 1), (1, 1)), (1, 1), 1, None)  # negative padding
    assert not onednn.supports(x.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float16), w, (1, 1),
                               (1, 1), (1, 1), 1, None)
    assert not onednn.supports(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), (1, 1), (1, 1), 1, None)
    assert not onednn.supports(x, w, (1, 1), (1, 1), (1, 1), 1, jnp.bfloat16)
    assert onednn.version().count(".") == 2


def test_in_a_loop_and_under_vmap():
    x, w = _operands(CASES[0], jnp.float32)
    f = lambda a: onednn.conv(a[None], w, (1, 1), (1, 1), (1, 1))[0]  # noqa: E731
    want = onednn.plain(x, w, (1, 1), (1, 1), (1, 1), jax.lax.Precision.HIGHEST, None)
    tol = 2e-5 * float(jnp.abs(want).max())
    np.testing.assert_allclose(jax.jit(lambda a: jax.lax.map(f, a))(x), want, atol=tol, rtol=0)
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x), want, atol=tol, rtol=0)


@pytest.mark.parametrize("conv_vjp", [True, False])
def test_layer_gradients_are_the_plain_ones(conv_vjp):
    """nn.conv2d with onednn_conv on (forward by oneDNN; gradients by conv_vjp's hand-written rules, whose
    stride-1 input gradients are oneDNN convolutions too, or XLA's) against the plain path, float32."""
    for case in CASES[:4]:
        x, w = _operands(case, jnp.float32, seed=1)
        stride, padding, dilation = case[2:]

        def loss(a, b, stride=stride, padding=padding, dilation=dilation):
            y = nn.conv2d(a, b, stride, padding, dilation, 1, jax.lax.Precision.HIGHEST, None)
            return jnp.sum(y * jnp.cos(y))

        outs = {}
        for spec in (["onednn_conv"] + (["conv_vjp"] if conv_vjp else []), "none"):
            with fast_paths.use(spec):
                jaxpr = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w))
                assert ("flaxdet_onednn_conv" in jaxpr) == (spec != "none")
                outs[str(spec)] = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
        (va, ga), (vb, gb) = outs.values()
        np.testing.assert_allclose(va, vb, rtol=1e-5)
        for a, b in zip(ga, gb):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.abs(b).max()))


def test_independent_calls_of_one_program():
    """XLA:CPU runs independent operations of a program at once on its threads: each call has its own scratchpad
    (oneDNN's default shares one between primitives; RTMDet's parallel CSP branches gave wrong results with it)."""
    ops = [_operands(((2, 40, 56, 32), (3, 3, 32)) + CASES[0][2:], jnp.float32, seed=i) for i in range(6)]
    xs, ws = [o[0] for o in ops], [o[1] for o in ops]
    got = jax.jit(lambda xs, ws: [onednn.conv(x, w, (1, 1), (1, 1), (1, 1)) for x, w in zip(xs, ws)])(xs, ws)
    for x, w, g in zip(xs, ws, got):
        want = onednn.plain(x, w, (1, 1), (1, 1), (1, 1), jax.lax.Precision.HIGHEST, None)
        np.testing.assert_allclose(g, want, rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


def test_commands_say_when_the_library_is_missing(monkeypatch):
    """`flaxdet infer` / `train` log one line when oneDNN's library is missing on CPU, nothing when it is there."""
    said = []
    assert not onednn.note_if_missing(said.append) and not said
    monkeypatch.setitem(onednn._state, "ok", False)
    monkeypatch.setitem(onednn._state, "reason", "/x/libflaxdet_onednn.so is not built (run `make native`)")
    assert onednn.note_if_missing(said.append)
    assert len(said) == 1 and "not oneDNN" in said[0] and "make native" in said[0]
    with fast_paths.use("none"):
        assert not onednn.note_if_missing(said.append) and len(said) == 1
