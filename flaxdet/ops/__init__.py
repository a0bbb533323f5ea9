"""Pure JAX detection ops: boxes, anchors, NMS, RoIAlign, mask pasting (static shapes, jit-able)."""

import jax
import jax.numpy as jnp
from jax import custom_batching


def exact_div(x, y):
    """``x / y`` with IEEE division, as torch divides.

    XLA's simplifier rewrites ``x / broadcast(c)`` into ``x * broadcast(1/c)`` -- for any scalar
    divisor that gets broadcast, constant or not, which is what ``vmap`` makes of a per-item divide.
    That is one ulp off, and it matters wherever a quotient is then rounded: ``ceil(roi_h / 7)`` picks
    RoIAlign's sampling grid, and 42 / 7 becomes 6.0000005, so 7 samples instead of torch's 6. Here
    the divisor is materialised at the full (batched) shape and hidden behind an optimization barrier,
    also under ``vmap`` (a custom batching rule); gradients are the usual ones."""
    x = jnp.asarray(x)
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y))
    return _exact_div(jnp.broadcast_to(x, shape), jnp.broadcast_to(jnp.asarray(y, x.dtype), shape))


@jax.custom_jvp
def _exact_div(x, y):
    return _ieee_div(x, y)


@_exact_div.defjvp
def _exact_div_jvp(primals, tangents):
    (x, y), (dx, dy) = primals, tangents
    q = _ieee_div(x, y)
    return q, (dx - q * dy) / y


@custom_batching.custom_vmap
def _ieee_div(x, y):  # x, y of one shape
    return x / jax.lax.optimization_barrier(y)


@_ieee_div.def_vmap
def _ieee_div_vmap(axis_size, in_batched, x, y):
    x, y = (a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip((x, y), in_batched))
    return _ieee_div(x, y), True
