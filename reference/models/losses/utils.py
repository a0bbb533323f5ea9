"""visdet ``models/losses/utils.py``: element-wise weight, then mean / sum / sum over ``avg_factor``."""
from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def reduce_loss(loss, reduction):
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()


def weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "mean":  # eps avoids 0/0 when every label is ignored
        return loss.sum() / (avg_factor + EPS)
    if reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss
