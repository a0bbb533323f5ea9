"""DiceLoss (visdet ``models/losses/dice_loss.py``), pure jnp: per row of probabilities p and binary target t,
``1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps)`` (``naive_dice=False``), or
``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` (naive)."""
from __future__ import annotations

import jax.numpy as jnp


def dice_loss(pred, target, eps=1e-3, naive_dice=False):
    """pred (n, ...) probabilities, target (n, ...) {0, 1} -> (n,)."""
    p = pred.reshape(pred.shape[0], -1)
    t = target.reshape(target.shape[0], -1).astype(p.dtype)
    a = jnp.sum(p * t, 1)
    if naive_dice:
        return 1 - (2 * a + eps) / (jnp.sum(p, 1) + jnp.sum(t, 1) + eps)
    return 1 - (2 * a) / ((jnp.sum(p * p, 1) + eps) + (jnp.sum(t * t, 1) + eps))
