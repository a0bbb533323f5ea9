"""NMS helpers: visdet ``cv/ops/nms.py:batched_nms`` and ``models/layers/bbox_nms.py:multiclass_nms``.
Both delegate to ``torchvision.ops.nms`` (IoU without +1; suppress iff IoU > thr)."""
from __future__ import annotations

import torch
from torchvision.ops import nms as tv_nms


def batched_nms(boxes, scores, idxs, iou_threshold: float, split_thr: int = 10000,
                class_agnostic: bool = False):
    """Returns (dets (K,5) sorted by score, keep indices). Class offset trick, as visdet."""
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        boxes_for_nms = boxes + offsets[:, None]
    if boxes_for_nms.shape[0] < split_thr:
        keep = tv_nms(boxes_for_nms, scores, iou_threshold)
        boxes, scores = boxes[keep], scores[keep]
    else:
        # visdet pops iou_threshold inside its loop, so groups after the first use 0.5
        # (a visdet bug we do not copy: every group uses iou_threshold here).
        total = scores.new_zeros(scores.size(), dtype=torch.bool)
        after = scores.new_zeros(scores.size())
        for i in torch.unique(idxs):
            mask = (idxs == i).nonzero(as_tuple=False).view(-1)
            k = tv_nms(boxes_for_nms[mask], scores[mask], iou_threshold)
            total[mask[k]] = True
            after[mask[k]] = scores[mask[k]]
        keep = total.nonzero(as_tuple=False).view(-1)
        scores, inds = after[keep].sort(descending=True)
        keep = keep[inds]
        boxes = boxes[keep]
    return torch.cat([boxes, scores[:, None]], -1), keep


def multiclass_nms(multi_bboxes, multi_scores, score_thr, nms_cfg, max_num=-1):
    """multi_bboxes (N, C*4) or (N,4); multi_scores (N, C+1) with background last."""
    num_classes = multi_scores.size(1) - 1
    if multi_bboxes.shape[1] > 4:
        bboxes = multi_bboxes.view(multi_scores.size(0), -1, 4)
    else:
        bboxes = multi_bboxes[:, None].expand(multi_scores.size(0), num_classes, 4)
    scores = multi_scores[:, :-1]
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device)
    labels = labels.view(1, -1).expand_as(scores)
    bboxes = bboxes.reshape(-1, 4)
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    inds = (scores > score_thr).nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    if bboxes.numel() == 0:
        return bboxes.new_zeros((0, 5)), labels
    dets, keep = batched_nms(bboxes, scores, labels, nms_cfg.iou_threshold, nms_cfg.split_thr,
                             nms_cfg.class_agnostic)
    if max_num > 0:
        dets, keep = dets[:max_num], keep[:max_num]
    return dets, labels[keep]
