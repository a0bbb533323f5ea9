"""CrossEntropyLoss (visdet ``models/losses/cross_entropy_loss.py``): softmax CE, sigmoid BCE with
one-hot expansion (RPN: class 0 = foreground, label ``num_classes`` = background -> all-zero row),
and ``mask_cross_entropy`` (BCE on each RoI's GT-class channel, plain mean)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flaxdet.config import CrossEntropyLossCfg
from flaxdet_reference.models.losses.utils import weight_reduce_loss


def cross_entropy(pred, label, weight=None, reduction="mean", avg_factor=None, class_weight=None,
                  ignore_index=-100, avg_non_ignore=False):
    ignore_index = -100 if ignore_index is None else ignore_index
    loss = F.cross_entropy(pred, label, weight=class_weight, reduction="none", ignore_index=ignore_index)
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = label.numel() - (label == ignore_index).sum().item()
    if weight is not None:
        weight = weight.float()
    return weight_reduce_loss(loss, weight=weight, reduction=reduction, avg_factor=avg_factor)


def _expand_onehot_labels(labels, label_weights, label_channels, ignore_index):
    bin_labels = labels.new_full((labels.size(0), label_channels), 0)
    valid_mask = (labels >= 0) & (labels != ignore_index)
    inds = torch.nonzero(valid_mask & (labels < label_channels), as_tuple=False)
    if inds.numel() > 0:
        bin_labels[inds, labels[inds]] = 1
    valid_mask = valid_mask.view(-1, 1).expand(labels.size(0), label_channels).float()
    if label_weights is None:
        bin_label_weights = valid_mask
    else:
        bin_label_weights = label_weights.view(-1, 1).repeat(1, label_channels) * valid_mask
    return bin_labels, bin_label_weights, valid_mask


def binary_cross_entropy(pred, label, weight=None, reduction="mean", avg_factor=None, class_weight=None,
                         ignore_index=-100, avg_non_ignore=False):
    ignore_index = -100 if ignore_index is None else ignore_index
    if pred.dim() != label.dim():
        label, weight, valid_mask = _expand_onehot_labels(label, weight, pred.size(-1), ignore_index)
    else:
        valid_mask = ((label >= 0) & (label != ignore_index)).float()
        weight = weight * valid_mask if weight is not None else valid_mask
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = valid_mask.sum().item()
    loss = F.binary_cross_entropy_with_logits(pred, label.float(), pos_weight=class_weight, reduction="none")
    return weight_reduce_loss(loss, weight.float(), reduction=reduction, avg_factor=avg_factor)


def mask_cross_entropy(pred, target, label, reduction="mean", avg_factor=None, class_weight=None,
                       ignore_index=None, **kwargs):
    assert ignore_index is None, "BCE loss does not support ignore_index"
    assert reduction == "mean" and avg_factor is None
    inds = torch.arange(0, pred.size(0), dtype=torch.long, device=pred.device)
    pred_slice = pred[inds, label].squeeze(1)
    return F.binary_cross_entropy_with_logits(pred_slice, target, weight=class_weight, reduction="mean")[None]


class CrossEntropyLoss(nn.Module):
    def __init__(self, cfg: CrossEntropyLossCfg):
        super().__init__()
        assert not (cfg.use_sigmoid and cfg.use_mask)
        self.cfg = cfg
        self.use_sigmoid = cfg.use_sigmoid
        self.use_mask = cfg.use_mask
        self.reduction = cfg.reduction
        self.loss_weight = cfg.loss_weight
        self.class_weight = cfg.class_weight
        self.ignore_index = cfg.ignore_index
        self.avg_non_ignore = cfg.avg_non_ignore
        self.cls_criterion = (binary_cross_entropy if cfg.use_sigmoid else
                              mask_cross_entropy if cfg.use_mask else cross_entropy)

    def forward(self, cls_score, label, weight=None, avg_factor=None, reduction_override=None, ignore_index=None,
                **kwargs):
        reduction = reduction_override or self.reduction
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        class_weight = None if self.class_weight is None else cls_score.new_tensor(self.class_weight)
        return self.loss_weight * self.cls_criterion(
            cls_score, label, weight, class_weight=class_weight, reduction=reduction, avg_factor=avg_factor,
            ignore_index=ignore_index, avg_non_ignore=self.avg_non_ignore, **kwargs)
