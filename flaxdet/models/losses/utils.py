"""Loss reduction (visdet ``models/losses/utils.py``): weighted sum over an average factor."""
from __future__ import annotations

import numpy as np

EPS = float(np.finfo(np.float32).eps)  # visdet's ``torch.finfo(torch.float32).eps`` beside avg_factor


def weight_reduce_loss(loss, weight=None, avg_factor=None):
    """visdet's ``weight_reduce_loss`` with reduction "mean": ``sum(loss * weight) / (avg_factor + eps)``,
    or the plain mean without ``avg_factor``."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean()
    return loss.sum() / (avg_factor + EPS)
