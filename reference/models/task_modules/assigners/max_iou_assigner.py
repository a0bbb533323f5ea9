"""MaxIoUAssigner + AssignResult (visdet ``task_modules/assigners/max_iou_assigner.py``,
``assign_result.py``).

``gt_inds``: -1 ignore, 0 negative, k > 0 the (k-1)-th GT. Steps, in order: all -1; max IoU in
[0, neg_iou_thr) -> 0; max IoU >= pos_iou_thr -> argmax GT; then, with ``match_low_quality``, each GT
in order whose best IoU >= min_pos_iou takes every prior tied at that best IoU (later GTs overwrite).
No GT: every prior is negative. (No ``gt_bboxes_ignore`` here: visdet's data never carries it.)
"""
from __future__ import annotations

import torch

from flaxdet.config import MaxIoUAssignerCfg
from flaxdet_reference.models.task_modules.assigners.iou2d_calculator import bbox_overlaps


class AssignResult:
    def __init__(self, num_gts, gt_inds, max_overlaps, labels):
        self.num_gts = num_gts
        self.gt_inds = gt_inds
        self.max_overlaps = max_overlaps
        self.labels = labels

    def add_gt_(self, gt_labels):
        """Prepend the GTs themselves as assigned candidates (the sampler's ``add_gt_as_proposals``)."""
        self_inds = torch.arange(1, len(gt_labels) + 1, dtype=torch.long, device=gt_labels.device)
        self.gt_inds = torch.cat([self_inds, self.gt_inds])
        self.max_overlaps = torch.cat([self.max_overlaps.new_ones(len(gt_labels)), self.max_overlaps])
        self.labels = torch.cat([gt_labels, self.labels])


class MaxIoUAssigner:
    def __init__(self, cfg: MaxIoUAssignerCfg):
        if cfg.iou_calculator is not None and dict(cfg.iou_calculator).get("dtype") is not None:
            raise ValueError("MaxIoUAssigner: only the float32 BboxOverlaps2D is supported")
        self.cfg = cfg
        self.pos_iou_thr = cfg.pos_iou_thr
        self.neg_iou_thr = cfg.neg_iou_thr
        self.min_pos_iou = cfg.min_pos_iou
        self.gt_max_assign_all = cfg.gt_max_assign_all
        self.match_low_quality = cfg.match_low_quality

    def assign(self, priors, gt_bboxes, gt_labels) -> AssignResult:
        return self.assign_wrt_overlaps(bbox_overlaps(gt_bboxes, priors), gt_labels)

    def assign_wrt_overlaps(self, overlaps, gt_labels) -> AssignResult:
        num_gts, num_bboxes = overlaps.size(0), overlaps.size(1)
        assigned_gt_inds = overlaps.new_full((num_bboxes,), -1, dtype=torch.long)
        if num_gts == 0 or num_bboxes == 0:
            if num_gts == 0:
                assigned_gt_inds[:] = 0
            return AssignResult(num_gts, assigned_gt_inds, overlaps.new_zeros((num_bboxes,)),
                                overlaps.new_full((num_bboxes,), -1, dtype=torch.long))
        max_overlaps, argmax_overlaps = overlaps.max(dim=0)
        gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)
        if isinstance(self.neg_iou_thr, float):
            assigned_gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        else:
            lo, hi = self.neg_iou_thr
            assigned_gt_inds[(max_overlaps >= lo) & (max_overlaps < hi)] = 0
        pos_inds = max_overlaps >= self.pos_iou_thr
        assigned_gt_inds[pos_inds] = argmax_overlaps[pos_inds] + 1
        if self.match_low_quality:
            for i in range(num_gts):
                if gt_max_overlaps[i] >= self.min_pos_iou:
                    if self.gt_max_assign_all:
                        assigned_gt_inds[overlaps[i, :] == gt_max_overlaps[i]] = i + 1
                    else:
                        assigned_gt_inds[gt_argmax_overlaps[i]] = i + 1
        assigned_labels = assigned_gt_inds.new_full((num_bboxes,), -1)
        pos = torch.nonzero(assigned_gt_inds > 0, as_tuple=False).squeeze()
        if pos.numel() > 0:
            assigned_labels[pos] = gt_labels[assigned_gt_inds[pos] - 1]
        return AssignResult(num_gts, assigned_gt_inds, max_overlaps, assigned_labels)
