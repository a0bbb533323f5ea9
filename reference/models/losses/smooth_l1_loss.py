"""L1Loss / SmoothL1Loss (visdet ``models/losses/smooth_l1_loss.py``). With no positive weight at all
both return ``(pred * weight).sum()`` (0, gradient 0) instead of dividing by ``avg_factor``."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import L1LossCfg, SmoothL1LossCfg
from flaxdet_reference.models.losses.utils import weight_reduce_loss


def smooth_l1_loss(pred, target, beta=1.0):
    assert beta > 0
    if target.numel() == 0:
        return pred.sum() * 0
    diff = torch.abs(pred - target)
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def l1_loss(pred, target):
    if target.numel() == 0:
        return pred.sum() * 0
    return torch.abs(pred - target)


class _WeightedRegressionLoss(nn.Module):
    def _elementwise(self, pred, target):
        raise NotImplementedError

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        if weight is not None and not torch.any(weight > 0):
            if pred.dim() == weight.dim() + 1:
                weight = weight.unsqueeze(1)
            return (pred * weight).sum()
        reduction = reduction_override or self.cfg.reduction
        return self.cfg.loss_weight * weight_reduce_loss(self._elementwise(pred, target), weight, reduction,
                                                         avg_factor)


class L1Loss(_WeightedRegressionLoss):
    def __init__(self, cfg: L1LossCfg):
        super().__init__()
        self.cfg = cfg

    def _elementwise(self, pred, target):
        return l1_loss(pred, target)


class SmoothL1Loss(_WeightedRegressionLoss):
    def __init__(self, cfg: SmoothL1LossCfg):
        super().__init__()
        self.cfg = cfg

    def _elementwise(self, pred, target):
        return smooth_l1_loss(pred, target, self.cfg.beta)
