"""CascadeRoIHead (visdet ``roi_heads/cascade_roi_head.py``): multi-stage test path and training losses.

Test (visdet ``_refine_roi`` / ``predict_mask``): every stage runs its own RoI extractor and bbox head on
the current RoIs; between stages the RoIs are regressed by that stage's head (``regress_by_class`` with
the argmax foreground class, decoded with the stage's stds and clipped to ``img_shape``). The final
scores are the mean of the stages' raw logits; softmax, decode and multiclass NMS use the last head on
the RoIs it saw. Masks: the mean of every stage's sigmoid probabilities, pasted with the last mask head
(``activate_map=True``).

Training: each stage assigns and samples with its own ``train_cfg`` (GTs prepended as proposals by the
sampler), its losses are logged as ``s{stage}.{name}`` and weighted by ``stage_loss_weights`` (``acc``
is not), and its sampled RoIs, regressed without gradient, minus the positives that were GTs, are the
next stage's proposals. visdet's training path crashes there (its ``BBoxHead.refine_bboxes`` kept the
MMDetection-2.x signature while ``CascadeRoIHead.loss`` calls it the 3.x way), so the refinement follows
MMDetection 3.x ``BBoxHead.refine_bboxes``: negatives take the argmax foreground class, positives their
GT class.
"""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import CascadeRoIHeadCfg
from flaxdet_reference.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from flaxdet_reference.models.roi_heads.roi_extractors.single_level_roi_extractor import SingleRoIExtractor
from flaxdet_reference.models.roi_heads.standard_roi_head import BBOX_HEADS, StandardRoIHead, bbox2roi
from flaxdet_reference.models.task_modules.assigners.max_iou_assigner import MaxIoUAssigner
from flaxdet_reference.models.task_modules.samplers.random_sampler import RandomSampler


def regress_by_class(bbox_head, priors, label, bbox_pred, img_shape):
    """visdet ``BBoxHead.regress_by_class``: decode the ``label`` class's deltas (class-agnostic heads:
    the only ones) on ``priors``, clipped to ``img_shape``."""
    if not bbox_head.reg_class_agnostic:
        inds = torch.stack([label * 4 + i for i in range(4)], 1)
        bbox_pred = torch.gather(bbox_pred, 1, inds)
    assert bbox_pred.size(1) == 4
    return bbox_head.bbox_coder.decode(priors, bbox_pred, max_shape=img_shape)


def refine_bboxes(bbox_head, sampling_results, bbox_results, img_shapes):
    """MMDetection 3.x ``BBoxHead.refine_bboxes``: per image, the sampled RoIs regressed by class (GT class
    for positives, argmax foreground class for negatives), positives that were GTs dropped. Returns
    per-image dict(bboxes) or None when nothing was sampled."""
    labels = bbox_results["bbox_targets"][0]
    cls_scores, rois, bbox_preds = bbox_results["cls_score"], bbox_results["rois"], bbox_results["bbox_pred"]
    if cls_scores.numel() == 0:
        return None
    cls_scores = cls_scores[:, :-1]  # drop background
    labels = torch.where(labels == bbox_head.num_classes, cls_scores.argmax(1), labels)
    out = []
    for i, (res, img_shape) in enumerate(zip(sampling_results, img_shapes)):
        inds = torch.nonzero(rois[:, 0] == i, as_tuple=False).squeeze(1)
        bboxes = regress_by_class(bbox_head, rois[inds, 1:], labels[inds], bbox_preds[inds], img_shape)
        keep = res.pos_is_gt.new_ones(inds.numel())
        keep[: len(res.pos_is_gt)] = 1 - res.pos_is_gt
        out.append(dict(bboxes=bboxes[keep.bool()]))
    return out


class CascadeRoIHead(nn.Module):
    def __init__(self, cfg: CascadeRoIHeadCfg):
        super().__init__()
        self.cfg = cfg
        self.num_stages = cfg.num_stages
        self.stage_loss_weights = cfg.stage_loss_weights
        self.test_cfg = cfg.test_cfg
        self.train_cfg = cfg.train_cfg
        self.bbox_roi_extractor = nn.ModuleList([SingleRoIExtractor(c) for c in cfg.bbox_roi_extractor])
        self.bbox_head = nn.ModuleList([BBOX_HEADS[c.TYPE](c) for c in cfg.bbox_head])
        if cfg.mask_head is not None:
            self.mask_head = nn.ModuleList([FCNMaskHead(c) for c in cfg.mask_head])
            if cfg.mask_roi_extractor is not None:
                self.share_roi_extractor = False
                self.mask_roi_extractor = nn.ModuleList([SingleRoIExtractor(c) for c in cfg.mask_roi_extractor])
            else:
                self.share_roi_extractor = True
                self.mask_roi_extractor = self.bbox_roi_extractor
        if self.train_cfg is not None:
            self.bbox_assigner = [MaxIoUAssigner(c.assigner) for c in self.train_cfg]
            self.bbox_sampler = [RandomSampler(c.sampler) for c in self.train_cfg]
        self.train_img_shapes = None  # set by CascadeRCNN.loss: refinement clips to each image's img_shape

    with_mask = StandardRoIHead.with_mask
    _canvas = StandardRoIHead._canvas
    _empty = StandardRoIHead._empty

    def _bbox_forward(self, stage, x, rois):
        ext = self.bbox_roi_extractor[stage]
        feats = ext(x[: ext.num_inputs], rois)
        cls_score, bbox_pred = self.bbox_head[stage](feats)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=feats)

    def _mask_forward(self, stage, x, rois):
        ext = self.mask_roi_extractor[stage]
        feats = ext(x[: ext.num_inputs], rois)
        return dict(mask_preds=self.mask_head[stage](feats), mask_feats=feats)

    # -- training -----------------------------------------------------------------------------------
    def loss(self, x, rpn_results_list, gts, generator=None, inject=None, stages=None):
        """As ``StandardRoIHead.loss``; ``inject``: one list per stage of per-image dict(pos_inds, neg_inds)
        into that stage's ``[GTs; proposals]``. Returns visdet's dict (``s{k}.loss_cls``, ``s{k}.acc``,
        ``s{k}.loss_bbox``[, ``s{k}.loss_mask``])."""
        img_shapes = self.train_img_shapes
        if img_shapes is None:
            raise ValueError("CascadeRoIHead.loss needs the images' img_shape (call CascadeRCNN.loss)")
        losses = {}
        results_list = rpn_results_list
        for stage in range(self.num_stages):
            w = self.stage_loss_weights[stage]
            sampling_results, assign_results = [], []
            for i, (props, gt) in enumerate(zip(results_list, gts)):
                priors = props["bboxes"]
                ar = self.bbox_assigner[stage].assign(priors, gt["bboxes"], gt["labels"])
                assign_results.append(ar)
                sampling_results.append(self.bbox_sampler[stage].sample(
                    ar, priors, gt["bboxes"], gt["labels"], generator,
                    None if inject is None else inject[stage][i]))
            bbox_results = self.bbox_loss(stage, x, sampling_results)
            for name, value in bbox_results["loss_bbox"].items():
                losses[f"s{stage}.{name}"] = value * w if "loss" in name else value
            if self.with_mask:
                mask_results = self.mask_loss(stage, x, sampling_results, [gt["masks"] for gt in gts])
                for name, value in mask_results["loss_mask"].items():
                    losses[f"s{stage}.{name}"] = value * w if "loss" in name else value
            if stages is not None:
                stages[f"s{stage}.proposals"] = results_list
                stages[f"s{stage}.rcnn.assign_results"] = assign_results
                stages[f"s{stage}.rcnn.sampling_results"] = sampling_results
                stages.update({f"s{stage}.rcnn.{k}": v for k, v in bbox_results.items() if k != "loss_bbox"})
                if self.with_mask:
                    stages.update({f"s{stage}.mask.{k}": v for k, v in mask_results.items() if k != "loss_mask"})
            if stage < self.num_stages - 1:
                with torch.no_grad():
                    results_list = refine_bboxes(self.bbox_head[stage], sampling_results, bbox_results, img_shapes)
                if results_list is None:
                    break
        return losses

    def bbox_loss(self, stage, x, sampling_results):
        rois = bbox2roi([r.priors for r in sampling_results])
        res = self._bbox_forward(stage, x, rois)
        out = self.bbox_head[stage].loss_and_target(res["cls_score"], res["bbox_pred"], rois, sampling_results,
                                                    self.train_cfg[stage])
        res.update(rois=rois, loss_bbox=out["loss_bbox"], bbox_targets=out["bbox_targets"])
        return res

    def mask_loss(self, stage, x, sampling_results, gt_masks):
        pos_rois = bbox2roi([r.pos_priors for r in sampling_results])
        res = self._mask_forward(stage, x, pos_rois)
        out = self.mask_head[stage].loss_and_target(res["mask_preds"], sampling_results, gt_masks,
                                                    self.train_cfg[stage])
        res.update(rois=pos_rois, loss_mask=out["loss_mask"], mask_targets=out["mask_targets"])
        return res

    # -- test ---------------------------------------------------------------------------------------
    def predict(self, x, proposals, img_metas, rescale=True, stages=None):
        """proposals: list of dicts with 'bboxes'. Returns per-image dicts bboxes/scores/labels[/masks].
        ``stages``: stage 0 under StandardRoIHead's names (``bbox_roi_extractor``, ``bbox_head.cls_score``,
        ``bbox_head.bbox_pred``), later stages as ``cascade.rois.k`` (the refined RoIs they ran on),
        ``cascade.bbox_roi_extractor.k``, ``cascade.bbox_head.k.{cls_score,bbox_pred}``, and the averaged
        logits as ``cascade.cls_score``."""
        rois = bbox2roi([p["bboxes"] for p in proposals])
        if rois.shape[0] == 0:
            return [self._empty(m) for m in img_metas]
        counts = [len(p["bboxes"]) for p in proposals]
        ms_scores = []
        for stage in range(self.num_stages):
            res = self._bbox_forward(stage, x, rois)
            if stages is not None:
                pre = "" if stage == 0 else "cascade."
                suf = "" if stage == 0 else f".{stage}"
                if stage:
                    stages[f"cascade.rois.{stage}"] = rois[:, 1:]
                stages[f"{pre}bbox_roi_extractor{suf}"] = res["bbox_feats"]
                stages[f"{pre}bbox_head{suf}.cls_score"] = res["cls_score"]
                stages[f"{pre}bbox_head{suf}.bbox_pred"] = res["bbox_pred"]
            rois_l = rois.split(counts, 0)
            cls_l = res["cls_score"].split(counts, 0)
            reg_l = res["bbox_pred"].split(counts, 0)
            ms_scores.append(cls_l)
            if stage < self.num_stages - 1:
                head = self.bbox_head[stage]
                refined = []
                for r, c, b, meta in zip(rois_l, cls_l, reg_l, img_metas):
                    if r.shape[0] == 0:
                        continue
                    label = c[:, :-1].argmax(dim=1)
                    boxes = regress_by_class(head, r[:, 1:], label, b, meta["img_shape"])
                    refined.append(torch.cat([r[:, [0]], boxes], dim=1))
                rois = torch.cat(refined) if refined else rois.new_zeros((0, 5))
        cls_scores = [sum(s[i] for s in ms_scores) / float(len(ms_scores)) for i in range(len(img_metas))]
        if stages is not None:
            stages["cascade.cls_score"] = torch.cat(cls_scores)
        bbox_rescale = rescale and not self.with_mask
        results = []
        for r, c, b, meta in zip(rois_l, cls_scores, reg_l, img_metas):
            if r.shape[0] == 0:
                results.append(self._empty(meta))
                continue
            bboxes, scores, labels = self.bbox_head[-1].predict_single(r, c, b, meta, self.test_cfg, bbox_rescale)
            results.append(dict(bboxes=bboxes, scores=scores, labels=labels))
        if self.with_mask:
            results = self.predict_mask(x, img_metas, results, rescale, stages)
        return results

    def predict_mask(self, x, img_metas, results, rescale, stages=None):
        """Every stage's mask head on the detections; their sigmoid probabilities averaged (visdet's
        ``merge_aug_masks``) and pasted by the last mask head without a second sigmoid."""
        mask_rois = bbox2roi([r["bboxes"] for r in results])
        if mask_rois.shape[0] == 0:
            for r, m in zip(results, img_metas):
                r["masks"] = torch.zeros(0, *self._canvas(m, rescale), dtype=torch.bool)
            return results
        probs = []
        for stage in range(self.num_stages):
            res = self._mask_forward(stage, x, mask_rois)
            if stages is not None:
                if stage == 0:
                    stages["mask_roi_extractor"] = res["mask_feats"]
                    stages["mask_head.mask_preds"] = res["mask_preds"]
                else:
                    stages[f"cascade.mask_head.{stage}.mask_preds"] = res["mask_preds"]
            probs.append(res["mask_preds"].sigmoid())
        merged = torch.stack(probs, dim=0).mean(dim=0) if len(probs) > 1 else probs[0]
        if stages is not None:
            stages["cascade.mask_probs"] = merged
        preds = merged.split([len(r["bboxes"]) for r in results], 0)
        for r, p, meta in zip(results, preds, img_metas):
            if len(r["bboxes"]) == 0:
                r["masks"] = torch.zeros(0, *self._canvas(meta, rescale), dtype=torch.bool)
                continue
            r["masks"], r["bboxes"] = self.mask_head[-1].predict_single(p, r["bboxes"], r["labels"], meta,
                                                                        self.test_cfg, rescale, activate_map=True)
        return results
