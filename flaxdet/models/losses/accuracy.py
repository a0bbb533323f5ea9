"""Classification accuracy (visdet ``models/losses/accuracy.py``), logged, not a loss."""
from __future__ import annotations

import jax.numpy as jnp


def accuracy(logits, labels, weight):
    """Top-1 accuracy in percent over the rows ``weight`` (0/1) keeps."""
    return 100.0 * ((jnp.argmax(logits, -1) == labels) * weight).sum() / jnp.maximum(weight.sum(), 1.0)
