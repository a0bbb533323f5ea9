"""CrossEntropyLoss's functions (visdet ``models/losses/cross_entropy_loss.py``), elementwise in jnp."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, labels):
    """Softmax cross-entropy per row: logits (..., C), int labels (...) -> (...)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], -1)[..., 0]


def binary_cross_entropy(logits, targets):
    """Sigmoid BCE from logits, elementwise, in torch's form ``max(x, 0) - x * t + log1p(exp(-|x|))``."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def mask_cross_entropy(mask_preds, targets, labels, weight):
    """visdet's ``mask_cross_entropy``: BCE of each row's ``labels`` channel of ``mask_preds`` (R, h, w, C)
    against ``targets`` (R, h, w), averaged over the rows ``weight`` (R,) keeps and their pixels.
    Returns (loss, the selected logits (R, h, w))."""
    lab = jnp.clip(labels, 0, mask_preds.shape[-1] - 1)  # rows weighted 0: any channel
    logits = jnp.take_along_axis(mask_preds, lab[:, None, None, None], -1)[..., 0]
    total = (binary_cross_entropy(logits, targets) * weight.astype(logits.dtype)[:, None, None]).sum()
    return total / jnp.maximum(weight.sum().astype(total.dtype) * targets.shape[1] * targets.shape[2], 1.0), logits
