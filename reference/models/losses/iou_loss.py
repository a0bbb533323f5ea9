"""GIoULoss (visdet ``models/losses/iou_loss.py``): ``1 - GIoU(pred, target)`` per aligned box pair (union and
enclosing area clamped to ``eps``), ``weight_reduce_loss``, times ``loss_weight``. With no positive weight at
all: ``(pred * weight).sum()`` (0, gradient 0)."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import GIoULossCfg
from flaxdet_reference.models.losses.utils import weight_reduce_loss
from flaxdet_reference.models.task_modules.assigners.iou2d_calculator import bbox_overlaps


def giou_loss(pred, target, eps=1e-7):
    return 1 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=eps)


class GIoULoss(nn.Module):
    def __init__(self, cfg: GIoULossCfg):
        super().__init__()
        self.cfg = cfg
        self.eps, self.reduction, self.loss_weight = cfg.eps, cfg.reduction, cfg.loss_weight

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        if weight is not None and not torch.any(weight > 0):
            if pred.dim() == weight.dim() + 1:
                weight = weight.unsqueeze(1)
            return (pred * weight).sum()
        reduction = reduction_override or self.reduction
        if weight is not None and weight.dim() > 1:
            if weight.shape != pred.shape:
                raise ValueError(f"GIoULoss weight {tuple(weight.shape)} vs pred {tuple(pred.shape)}")
            weight = weight.mean(-1)
        loss = weight_reduce_loss(giou_loss(pred, target, self.eps), weight, reduction, avg_factor)
        return self.loss_weight * loss
