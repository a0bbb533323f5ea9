"""AnchorHead's training path (visdet ``dense_heads/anchor_head.py``), the base of RPNHead.

Per image: anchors of all levels concatenated, candidates = the valid anchors (inside the image's own
``pad_shape``; with ``allowed_border >= 0`` also inside ``img_shape`` + border), MaxIoUAssigner,
RandomSampler (indices into the valid-anchor list), delta targets on the positives, then everything
unmapped back to all anchors. Losses per level, each normalised by ``avg_factor`` = sum over images
of max(#pos, 1) + max(#neg, 1).
"""
from __future__ import annotations

import torch
from torch import nn

from flaxdet_reference.models.losses import build_loss
from flaxdet_reference.models.task_modules.assigners.max_iou_assigner import MaxIoUAssigner
from flaxdet_reference.models.task_modules.samplers.random_sampler import RandomSampler


def anchor_inside_flags(flat_anchors, valid_flags, img_shape, allowed_border=0):
    if allowed_border < 0:
        return valid_flags
    img_h, img_w = img_shape[:2]
    return valid_flags & ((flat_anchors[:, 0] >= -allowed_border) & (flat_anchors[:, 1] >= -allowed_border)
                          & (flat_anchors[:, 2] < img_w + allowed_border)
                          & (flat_anchors[:, 3] < img_h + allowed_border))


def unmap(data, count, inds, fill=0):
    """Scatter ``data`` (rows of the ``inds`` subset) back into ``count`` rows filled with ``fill``."""
    ret = data.new_full((count,) + data.size()[1:], fill)
    ret[inds.type(torch.bool)] = data
    return ret


def images_to_levels(target, num_levels):
    """[per image (A,...)] -> [per level (N, A_l, ...)]."""
    target = torch.stack(target, 0)
    out, start = [], 0
    for n in num_levels:
        out.append(target[:, start:start + n])
        start += n
    return out


class AnchorHead(nn.Module):
    """Loss methods only; subclasses define the layers, ``prior_generator``, ``bbox_coder``,
    ``num_classes``, ``cls_out_channels`` and call :meth:`init_train`."""

    def init_train(self, cfg):
        self.train_cfg = cfg.train_cfg
        self.reg_decoded_bbox = cfg.reg_decoded_bbox
        self.loss_cls = build_loss(cfg.loss_cls)
        self.loss_bbox = build_loss(cfg.loss_bbox)
        if self.train_cfg is not None:
            self.assigner = MaxIoUAssigner(self.train_cfg.assigner)
            self.sampler = RandomSampler(self.train_cfg.sampler)

    def get_anchors(self, featmap_sizes, img_metas, device="cpu"):
        anchors = self.prior_generator.grid_priors(featmap_sizes, device=device)
        return ([anchors for _ in img_metas],
                [self.prior_generator.valid_flags(featmap_sizes, m["pad_shape"], device) for m in img_metas])

    def _get_targets_single(self, flat_anchors, valid_flags, gt, img_meta, generator=None, inject=None):
        inside_flags = anchor_inside_flags(flat_anchors, valid_flags, img_meta["img_shape"][:2],
                                           self.train_cfg.allowed_border)
        if not inside_flags.any():
            raise ValueError("There is no valid anchor inside the image boundary.")
        anchors = flat_anchors[inside_flags]
        assign_result = self.assigner.assign(anchors, gt["bboxes"], gt["labels"])
        sampling_result = self.sampler.sample(assign_result, anchors, gt["bboxes"], gt["labels"], generator, inject)
        n = anchors.shape[0]
        bbox_targets = anchors.new_zeros(n, 4)
        bbox_weights = anchors.new_zeros(n, 4)
        labels = anchors.new_full((n,), self.num_classes, dtype=torch.long)
        label_weights = anchors.new_zeros(n, dtype=torch.float)
        pos_inds, neg_inds = sampling_result.pos_inds, sampling_result.neg_inds
        if len(pos_inds) > 0:
            if self.reg_decoded_bbox:
                pos_bbox_targets = sampling_result.pos_gt_bboxes
            else:
                pos_bbox_targets = self.bbox_coder.encode(sampling_result.pos_priors, sampling_result.pos_gt_bboxes)
            bbox_targets[pos_inds, :] = pos_bbox_targets
            bbox_weights[pos_inds, :] = 1.0
            labels[pos_inds] = sampling_result.pos_gt_labels
            pos_weight = self.train_cfg.pos_weight
            label_weights[pos_inds] = 1.0 if pos_weight <= 0 else pos_weight
        if len(neg_inds) > 0:
            label_weights[neg_inds] = 1.0
        total = flat_anchors.size(0)
        return (unmap(labels, total, inside_flags, fill=self.num_classes), unmap(label_weights, total, inside_flags),
                unmap(bbox_targets, total, inside_flags), unmap(bbox_weights, total, inside_flags),
                assign_result, sampling_result)

    def get_targets(self, anchor_list, valid_flag_list, gts, img_metas, generator=None, inject=None):
        num_level_anchors = [a.size(0) for a in anchor_list[0]]
        results = [self._get_targets_single(torch.cat(a), torch.cat(v), gt, m, generator,
                                            None if inject is None else inject[i])
                   for i, (a, v, gt, m) in enumerate(zip(anchor_list, valid_flag_list, gts, img_metas))]
        labels, label_weights, bbox_targets, bbox_weights, assign_results, sampling_results = zip(*results)
        avg_factor = sum(r.avg_factor for r in sampling_results)
        return dict(labels=images_to_levels(list(labels), num_level_anchors),
                    label_weights=images_to_levels(list(label_weights), num_level_anchors),
                    bbox_targets=images_to_levels(list(bbox_targets), num_level_anchors),
                    bbox_weights=images_to_levels(list(bbox_weights), num_level_anchors),
                    avg_factor=avg_factor, assign_results=assign_results, sampling_results=sampling_results)

    def loss_by_feat_single(self, cls_score, bbox_pred, anchors, labels, label_weights, bbox_targets,
                            bbox_weights, avg_factor):
        labels = labels.reshape(-1)
        label_weights = label_weights.reshape(-1)
        cls_score = cls_score.permute(0, 2, 3, 1).reshape(-1, self.cls_out_channels)
        loss_cls = self.loss_cls(cls_score, labels, label_weights, avg_factor=avg_factor)
        bbox_targets = bbox_targets.reshape(-1, 4)
        bbox_weights = bbox_weights.reshape(-1, 4)
        bbox_pred = bbox_pred.permute(0, 2, 3, 1).reshape(-1, 4)
        if self.reg_decoded_bbox:
            bbox_pred = self.bbox_coder.decode(anchors.reshape(-1, 4), bbox_pred)
        loss_bbox = self.loss_bbox(bbox_pred, bbox_targets, bbox_weights, avg_factor=avg_factor)
        return loss_cls, loss_bbox

    def loss_by_feat(self, cls_scores, bbox_preds, gts, img_metas, generator=None, inject=None, stages=None):
        """gts: per image dict(bboxes (k,4), labels (k,)). Returns dict(loss_cls=[per level],
        loss_bbox=[per level]); ``stages`` (a dict) receives the targets and sampling results."""
        featmap_sizes = [c.size()[-2:] for c in cls_scores]
        anchor_list, valid_flag_list = self.get_anchors(featmap_sizes, img_metas, cls_scores[0].device)
        t = self.get_targets(anchor_list, valid_flag_list, gts, img_metas, generator, inject)
        num_level_anchors = [a.size(0) for a in anchor_list[0]]
        all_anchors = images_to_levels([torch.cat(a) for a in anchor_list], num_level_anchors)
        losses_cls, losses_bbox = [], []
        for lvl in range(len(cls_scores)):
            c, b = self.loss_by_feat_single(cls_scores[lvl], bbox_preds[lvl], all_anchors[lvl], t["labels"][lvl],
                                            t["label_weights"][lvl], t["bbox_targets"][lvl],
                                            t["bbox_weights"][lvl], t["avg_factor"])
            losses_cls.append(c)
            losses_bbox.append(b)
        if stages is not None:
            stages.update({f"targets.{k}": v for k, v in t.items()})
        return dict(loss_cls=losses_cls, loss_bbox=losses_bbox)
