"""L1Loss and SmoothL1Loss (visdet ``models/losses/smooth_l1_loss.py``), elementwise in jnp."""
from __future__ import annotations

import jax.numpy as jnp


def l1_loss(pred, target):
    return jnp.abs(pred - target)


def smooth_l1_loss(pred, target, beta=1.0):
    """visdet: ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``."""
    if beta <= 0:
        raise ValueError(f"SmoothL1Loss needs beta > 0, got {beta}")
    d = jnp.abs(pred - target)
    return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
