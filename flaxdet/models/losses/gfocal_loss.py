"""QualityFocalLoss (visdet ``models/losses/gfocal_loss.py``), sigmoid form, pure jnp.

Per prior p and class c with logit z: the target t is the quality score (the IoU of the prior's decoded box with
its GT) at a positive's label and 0 elsewhere (negatives: 0 everywhere), and
``loss = BCEWithLogits(z, t) * |t - sigmoid(z)| ** beta`` -- the same formula visdet evaluates in two steps
(every entry against 0, then the positives' label entries replaced). Summed over classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bce_with_logits(z, t):
    """torch's ``binary_cross_entropy_with_logits(z, t, reduction='none')``, the stable form."""
    return jnp.maximum(z, 0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z)))


def quality_focal_loss(logits, labels, scores, beta=2.0):
    """logits (..., C); labels (...,) int in [0, C] (C: background); scores (...,) quality targets ->
    (...,) the loss summed over classes."""
    c = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, c, dtype=logits.dtype)  # a background label (C) is all zeros
    t = onehot * scores[..., None].astype(logits.dtype)
    sig = jax.nn.sigmoid(logits)
    mod = jnp.square(jnp.abs(t - sig)) if beta == 2.0 else jnp.abs(t - sig) ** beta
    return jnp.sum(bce_with_logits(logits, t) * mod, -1)
