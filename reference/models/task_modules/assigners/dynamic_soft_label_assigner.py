"""DynamicSoftLabelAssigner (visdet ``task_modules/assigners/dynamic_soft_label_assigner.py``), RTMDet's.

Inputs over the image's valid priors: priors (n, 4: x, y, stride_w, stride_h), decoded boxes (n, 4), logits
(n, C); GT boxes (G, 4), labels (G,) and, for RTMDet-Ins, masks (G, H, W).

1. G = 0 or n = 0: every prior negative (gt_ind 0, label -1, max_overlap 0).
2. Candidates: priors whose centre is strictly inside at least one GT box (none: all negative, as in 1).
3. GT centre: the centre of mass of the mask in integer pixel indices (masks given), else the box centre.
4. cost[c, g] = soft-label BCE * |soft - sigmoid|^2 summed over classes (soft = onehot(label_g) * IoU)
   + ``iou_weight`` * -log(IoU + 1e-7) + 10^(|prior - centre| / stride - ``soft_center_radius``).
5. k_g = max(int(sum of the top-min(topk, n_cand) IoUs of GT g), 1); each GT marks its k_g cheapest candidates;
   a candidate marked by several GTs keeps argmin_g cost over all GTs.
6. Positives: gt_ind g + 1, label_g, max_overlap = IoU; the rest gt_ind 0, label -1, max_overlap -1e8.

``assign(..., stages=dict)`` also returns the intermediates (``in_gts``, ``cost``, ``pairwise_ious``) under the
goldens' names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flaxdet.config import DynamicSoftLabelAssignerCfg
from flaxdet_reference.models.task_modules.assigners.iou2d_calculator import bbox_overlaps
from flaxdet_reference.models.task_modules.assigners.max_iou_assigner import AssignResult

INF = 100000000
EPS = 1.0e-7


def center_of_mass(masks, eps=1e-7):
    """(n, h, w) bool/0-1 masks -> (n, 2) (x, y) in pixel indices (no +0.5); an empty mask gives (0, 0)."""
    _, h, w = masks.shape
    grid_h = torch.arange(h, device=masks.device)[:, None]
    grid_w = torch.arange(w, device=masks.device)
    normalizer = masks.sum(dim=(1, 2)).float().clamp(min=eps)
    center_y = (masks * grid_h).sum(dim=(1, 2)) / normalizer
    center_x = (masks * grid_w).sum(dim=(1, 2)) / normalizer
    return torch.cat([center_x[:, None], center_y[:, None]], dim=1)


class DynamicSoftLabelAssigner:
    def __init__(self, cfg: DynamicSoftLabelAssignerCfg):
        if cfg.iou_calculator is not None and dict(cfg.iou_calculator).get("type", "BboxOverlaps2D") != \
                "BboxOverlaps2D":
            raise ValueError("DynamicSoftLabelAssigner: only the BboxOverlaps2D iou_calculator is supported")
        self.cfg = cfg
        self.soft_center_radius = cfg.soft_center_radius
        self.topk = cfg.topk
        self.iou_weight = cfg.iou_weight

    def assign(self, priors, decoded_bboxes, pred_scores, gt_bboxes, gt_labels, gt_masks=None, stages=None):
        num_gt, num_bboxes = gt_bboxes.size(0), decoded_bboxes.size(0)
        assigned_gt_inds = decoded_bboxes.new_full((num_bboxes,), 0, dtype=torch.long)

        def all_negative():
            return AssignResult(num_gt, assigned_gt_inds, decoded_bboxes.new_zeros((num_bboxes,)),
                                decoded_bboxes.new_full((num_bboxes,), -1, dtype=torch.long))

        if num_gt == 0 or num_bboxes == 0:
            return all_negative()
        prior_center = priors[:, :2]
        deltas = torch.cat([prior_center[:, None] - gt_bboxes[:, :2], gt_bboxes[:, 2:] - prior_center[:, None]], -1)
        is_in_gts = deltas.min(dim=-1).values > 0
        valid_mask = is_in_gts.sum(dim=1) > 0
        if stages is not None:
            stages["in_gts"] = valid_mask.clone()
        valid_decoded_bbox = decoded_bboxes[valid_mask]
        valid_pred_scores = pred_scores[valid_mask]
        num_valid = valid_decoded_bbox.size(0)
        if num_valid == 0:
            return all_negative()

        if gt_masks is not None:
            gt_center = center_of_mass(gt_masks, eps=EPS)
        else:
            gt_center = (gt_bboxes[:, :2] + gt_bboxes[:, 2:]) / 2.0
        valid_prior = priors[valid_mask]
        strides = valid_prior[:, 2]
        distance = (valid_prior[:, None, :2] - gt_center[None, :, :]).pow(2).sum(-1).sqrt() / strides[:, None]
        soft_center_prior = torch.pow(10, distance - self.soft_center_radius)

        pairwise_ious = bbox_overlaps(valid_decoded_bbox, gt_bboxes)
        iou_cost = -torch.log(pairwise_ious + EPS) * self.iou_weight

        gt_onehot_label = F.one_hot(gt_labels.to(torch.int64), pred_scores.shape[-1]).float().unsqueeze(0)
        gt_onehot_label = gt_onehot_label.repeat(num_valid, 1, 1)
        valid_pred_scores = valid_pred_scores.unsqueeze(1).repeat(1, num_gt, 1)
        soft_label = gt_onehot_label * pairwise_ious[..., None]
        scale_factor = soft_label - valid_pred_scores.sigmoid()
        soft_cls_cost = F.binary_cross_entropy_with_logits(valid_pred_scores, soft_label, reduction="none")
        soft_cls_cost = (soft_cls_cost * scale_factor.abs().pow(2.0)).sum(dim=-1)
        cost_matrix = soft_cls_cost + iou_cost + soft_center_prior
        if stages is not None:
            stages.update(cost=cost_matrix, pairwise_ious=pairwise_ious)

        matched_pred_ious, matched_gt_inds, fg_mask = self.dynamic_k_matching(cost_matrix, pairwise_ious, num_gt)
        valid_mask[valid_mask.clone()] = fg_mask  # visdet narrows the candidate mask to the matched ones

        assigned_gt_inds[valid_mask] = matched_gt_inds + 1
        assigned_labels = assigned_gt_inds.new_full((num_bboxes,), -1)
        assigned_labels[valid_mask] = gt_labels[matched_gt_inds].long()
        # float32 in visdet; the IoUs' dtype lets reference/ run in float64 too
        max_overlaps = assigned_gt_inds.new_full((num_bboxes,), -INF, dtype=matched_pred_ious.dtype)
        max_overlaps[valid_mask] = matched_pred_ious
        return AssignResult(num_gt, assigned_gt_inds, max_overlaps, assigned_labels)

    def dynamic_k_matching(self, cost, pairwise_ious, num_gt):
        """-> (IoU of each matched candidate, its GT index, (n_cand,) bool: matched)."""
        matching_matrix = torch.zeros_like(cost, dtype=torch.uint8)
        candidate_topk = min(self.topk, pairwise_ious.size(0))
        topk_ious, _ = torch.topk(pairwise_ious, candidate_topk, dim=0)
        dynamic_ks = torch.clamp(topk_ious.sum(0).int(), min=1)
        for gt_idx in range(num_gt):
            _, pos_idx = torch.topk(cost[:, gt_idx], k=int(dynamic_ks[gt_idx]), largest=False)
            matching_matrix[:, gt_idx][pos_idx] = 1
        prior_match_gt_mask = matching_matrix.sum(1) > 1
        if prior_match_gt_mask.sum() > 0:
            _, cost_argmin = torch.min(cost[prior_match_gt_mask, :], dim=1)
            matching_matrix[prior_match_gt_mask, :] *= 0
            matching_matrix[prior_match_gt_mask, cost_argmin] = 1
        fg_mask_inboxes = matching_matrix.sum(1) > 0
        matched_gt_inds = matching_matrix[fg_mask_inboxes, :].argmax(1)
        matched_pred_ious = (matching_matrix * pairwise_ious).sum(1)[fg_mask_inboxes]
        return matched_pred_ious, matched_gt_inds, fg_mask_inboxes
