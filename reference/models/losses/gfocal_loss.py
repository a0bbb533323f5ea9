"""QualityFocalLoss (visdet ``models/losses/gfocal_loss.py``; sigmoid only, target = (label, quality score)).

Per prior: every class gets ``BCEWithLogits(z, 0) * sigmoid(z)^beta``; at a positive's label (0 <= label < C)
that term is replaced by ``BCEWithLogits(z, score) * |score - sigmoid(z)|^beta``; summed over classes, then
``weight_reduce_loss`` (RTMDet: ``avg_factor=1.0``, i.e. sum / (1 + float32 eps)), times ``loss_weight``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from flaxdet.config import QualityFocalLossCfg
from flaxdet_reference.models.losses.utils import weight_reduce_loss


def quality_focal_loss(pred, target, beta=2.0):
    label, score = target
    pred_sigmoid = pred.sigmoid()
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy_with_logits(pred, zerolabel, reduction="none") * scale_factor.pow(beta)
    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy_with_logits(
        pred[pos, pos_label], score[pos], reduction="none") * scale_factor.abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


class QualityFocalLoss(nn.Module):
    def __init__(self, cfg: QualityFocalLossCfg):
        super().__init__()
        if not cfg.use_sigmoid or cfg.activated:
            raise ValueError("QualityFocalLoss: only use_sigmoid=True, activated=False (as visdet)")
        self.cfg = cfg
        self.beta, self.reduction, self.loss_weight = cfg.beta, cfg.reduction, cfg.loss_weight

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        reduction = reduction_override or self.reduction
        loss = weight_reduce_loss(quality_focal_loss(pred, target, self.beta), weight, reduction, avg_factor)
        return self.loss_weight * loss
