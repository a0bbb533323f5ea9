"""DiceLoss (visdet ``models/losses/dice_loss.py``), on sigmoid probabilities p and 0/1 targets t per instance:
``1 - 2 sum(p t) / ((sum p^2 + eps) + (sum t^2 + eps))`` (``naive_dice``: ``1 - (2 sum(p t) + eps) / (sum p +
sum t + eps)``), ``weight_reduce_loss``, times ``loss_weight``."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import DiceLossCfg
from flaxdet_reference.models.losses.utils import weight_reduce_loss


def dice_loss(pred, target, weight=None, eps=1e-3, reduction="mean", naive_dice=False, avg_factor=None):
    inputs = pred.flatten(1)
    target = target.flatten(1).float()
    a = torch.sum(inputs * target, 1)
    if naive_dice:
        d = (2 * a + eps) / (torch.sum(inputs, 1) + torch.sum(target, 1) + eps)
    else:
        b = torch.sum(inputs * inputs, 1) + eps
        c = torch.sum(target * target, 1) + eps
        d = (2 * a) / (b + c)
    loss = 1 - d
    if weight is not None and (weight.ndim != loss.ndim or len(weight) != len(pred)):
        raise ValueError(f"DiceLoss weight {tuple(weight.shape)} vs {len(pred)} instances")
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


class DiceLoss(nn.Module):
    def __init__(self, cfg: DiceLossCfg):
        super().__init__()
        if cfg.activate and not cfg.use_sigmoid:
            raise ValueError("DiceLoss: activate=True needs use_sigmoid=True (as visdet)")
        self.cfg = cfg
        self.activate, self.reduction = cfg.activate, cfg.reduction
        self.naive_dice, self.loss_weight, self.eps = cfg.naive_dice, cfg.loss_weight, cfg.eps

    def forward(self, pred, target, weight=None, reduction_override=None, avg_factor=None):
        reduction = reduction_override or self.reduction
        if self.activate:
            pred = pred.sigmoid()
        return self.loss_weight * dice_loss(pred, target, weight, eps=self.eps, reduction=reduction,
                                            naive_dice=self.naive_dice, avg_factor=avg_factor)
