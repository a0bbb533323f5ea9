"""Losses (visdet ``models/losses``) built from their config dataclasses."""
from __future__ import annotations

from flaxdet_reference.models.losses.accuracy import accuracy  # noqa: F401
from flaxdet_reference.models.losses.cross_entropy_loss import CrossEntropyLoss
from flaxdet_reference.models.losses.dice_loss import DiceLoss
from flaxdet_reference.models.losses.gfocal_loss import QualityFocalLoss
from flaxdet_reference.models.losses.iou_loss import GIoULoss
from flaxdet_reference.models.losses.smooth_l1_loss import L1Loss, SmoothL1Loss

LOSSES = {"CrossEntropyLoss": CrossEntropyLoss, "L1Loss": L1Loss, "SmoothL1Loss": SmoothL1Loss,
          "QualityFocalLoss": QualityFocalLoss, "GIoULoss": GIoULoss, "DiceLoss": DiceLoss}


def build_loss(cfg):
    if cfg.TYPE not in LOSSES:
        raise ValueError(f"loss type {cfg.TYPE!r} is not supported by the reference (have {sorted(LOSSES)})")
    return LOSSES[cfg.TYPE](cfg)
