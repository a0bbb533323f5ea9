"""visdet ``models/losses/accuracy.py`` (top-1): percentage of rows whose argmax is the label."""
from __future__ import annotations


def accuracy(pred, target):
    if pred.size(0) == 0:
        return pred.new_tensor(0.0)
    _, pred_label = pred.topk(1, dim=1)
    correct = pred_label.t().eq(target.view(1, -1).expand_as(pred_label.t()))
    return correct[:1].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / pred.size(0))
