"""Losses (visdet ``models/losses``): elementwise functions, reduced by ``utils.weight_reduce_loss``."""
from __future__ import annotations

from flaxdet.models.losses.accuracy import accuracy
from flaxdet.models.losses.cross_entropy_loss import binary_cross_entropy, cross_entropy, mask_cross_entropy
from flaxdet.models.losses.dice_loss import dice_loss
from flaxdet.models.losses.gfocal_loss import bce_with_logits, quality_focal_loss
from flaxdet.models.losses.iou_loss import aligned_giou, giou_loss
from flaxdet.models.losses.smooth_l1_loss import l1_loss, smooth_l1_loss
from flaxdet.models.losses.utils import EPS, weight_reduce_loss

__all__ = ["EPS", "accuracy", "aligned_giou", "bce_with_logits", "binary_cross_entropy", "cross_entropy", "dice_loss",
           "giou_loss", "l1_loss", "mask_cross_entropy", "quality_focal_loss", "regression_loss", "smooth_l1_loss",
           "weight_reduce_loss"]


def regression_loss(loss_cfg):
    """The elementwise box loss ``(pred, target) -> loss`` a head's ``loss_bbox`` config names."""
    if loss_cfg.TYPE == "L1Loss":
        return l1_loss
    if loss_cfg.TYPE == "SmoothL1Loss":
        beta = float(loss_cfg.beta)
        return lambda pred, target: smooth_l1_loss(pred, target, beta)
    raise ValueError(f"box loss {loss_cfg.TYPE!r} is not supported in training (L1Loss, SmoothL1Loss)")
