"""StandardRoIHead (visdet ``roi_heads/standard_roi_head.py``): test path and training losses."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import StandardRoIHeadCfg
from flaxdet_reference.models.roi_heads.bbox_heads.convfc_bbox_head import (
    ConvFCBBoxHead,
    Shared2FCBBoxHead,
    Shared4Conv1FCBBoxHead,
)
from flaxdet_reference.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from flaxdet_reference.models.roi_heads.roi_extractors.single_level_roi_extractor import SingleRoIExtractor
from flaxdet_reference.models.task_modules.assigners.max_iou_assigner import MaxIoUAssigner
from flaxdet_reference.models.task_modules.samplers.random_sampler import RandomSampler

BBOX_HEADS = {"ConvFCBBoxHead": ConvFCBBoxHead, "Shared2FCBBoxHead": Shared2FCBBoxHead,
              "Shared4Conv1FCBBoxHead": Shared4Conv1FCBBoxHead}


def bbox2roi(bbox_list):
    """[(n_i,4)] -> (sum n_i, 5) rows [batch_idx, x1, y1, x2, y2]."""
    rois = [torch.cat([b.new_full((b.size(0), 1), i), b[:, :4]], dim=-1) for i, b in enumerate(bbox_list)]
    return torch.cat(rois, 0)


class StandardRoIHead(nn.Module):
    def __init__(self, cfg: StandardRoIHeadCfg):
        super().__init__()
        self.cfg = cfg
        self.test_cfg = cfg.test_cfg
        self.train_cfg = cfg.train_cfg
        if isinstance(self.train_cfg, tuple):
            raise ValueError("StandardRoIHead: a per-stage (cascade) rcnn train_cfg is not supported")
        if self.train_cfg is not None:
            self.bbox_assigner = MaxIoUAssigner(self.train_cfg.assigner)
            self.bbox_sampler = RandomSampler(self.train_cfg.sampler)
        if cfg.shared_head is not None:
            raise ValueError("StandardRoIHead: shared_head is not supported")
        self.bbox_roi_extractor = SingleRoIExtractor(cfg.bbox_roi_extractor)
        self.bbox_head = BBOX_HEADS[cfg.bbox_head.TYPE](cfg.bbox_head)
        if cfg.mask_head is not None:
            self.mask_roi_extractor = SingleRoIExtractor(cfg.mask_roi_extractor)
            self.mask_head = FCNMaskHead(cfg.mask_head)

    @property
    def with_mask(self):
        return hasattr(self, "mask_head")

    def _bbox_forward(self, x, rois):
        feats = self.bbox_roi_extractor(x[: self.bbox_roi_extractor.num_inputs], rois)
        cls_score, bbox_pred = self.bbox_head(feats)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=feats)

    def _mask_forward(self, x, rois):
        feats = self.mask_roi_extractor(x[: self.mask_roi_extractor.num_inputs], rois)
        return dict(mask_preds=self.mask_head(feats), mask_feats=feats)

    # -- training -----------------------------------------------------------------------------------
    def loss(self, x, rpn_results_list, gts, generator=None, inject=None, stages=None):
        """rpn_results_list: per image dict(bboxes (P_i, 4)); gts: per image dict(bboxes, labels[, masks]).
        ``inject``: per image dict(pos_inds, neg_inds) into [GTs; proposals]. Returns visdet's dict
        (loss_cls, acc, loss_bbox[, loss_mask])."""
        sampling_results, assign_results = [], []
        for i, (props, gt) in enumerate(zip(rpn_results_list, gts)):
            priors = props["bboxes"]
            assign_result = self.bbox_assigner.assign(priors, gt["bboxes"], gt["labels"])
            assign_results.append(assign_result)
            sampling_results.append(self.bbox_sampler.sample(assign_result, priors, gt["bboxes"], gt["labels"],
                                                             generator, None if inject is None else inject[i]))
        losses = {}
        bbox_results = self.bbox_loss(x, sampling_results)
        losses.update(bbox_results["loss_bbox"])
        if self.with_mask:
            mask_results = self.mask_loss(x, sampling_results, [gt["masks"] for gt in gts])
            losses.update(mask_results["loss_mask"])
        if stages is not None:
            stages["rcnn.assign_results"] = assign_results  # after add_gt_: [GTs; proposals]
            stages["rcnn.sampling_results"] = sampling_results
            stages.update({f"rcnn.{k}": v for k, v in bbox_results.items() if k != "loss_bbox"})
            if self.with_mask:
                stages.update({f"mask.{k}": v for k, v in mask_results.items() if k != "loss_mask"})
        return losses

    def bbox_loss(self, x, sampling_results):
        rois = bbox2roi([r.priors for r in sampling_results])
        res = self._bbox_forward(x, rois)
        out = self.bbox_head.loss_and_target(res["cls_score"], res["bbox_pred"], rois, sampling_results,
                                             self.train_cfg)
        res.update(rois=rois, loss_bbox=out["loss_bbox"], bbox_targets=out["bbox_targets"])
        return res

    def mask_loss(self, x, sampling_results, gt_masks):
        """Positive priors only, through the mask head's own RoI extractor (visdet's Mask R-CNN
        configs never share it)."""
        pos_rois = bbox2roi([r.pos_priors for r in sampling_results])
        res = self._mask_forward(x, pos_rois)
        out = self.mask_head.loss_and_target(res["mask_preds"], sampling_results, gt_masks, self.train_cfg)
        res.update(rois=pos_rois, loss_mask=out["loss_mask"], mask_targets=out["mask_targets"])
        return res

    def predict(self, x, proposals, img_metas, rescale=True, stages=None):
        """proposals: list of dicts with 'bboxes'. Returns per-image dicts bboxes/scores/labels[/masks]."""
        cfg = self.test_cfg
        rois = bbox2roi([p["bboxes"] for p in proposals])
        if rois.shape[0] == 0:
            return [self._empty(m) for m in img_metas]
        res = self._bbox_forward(x, rois)
        if stages is not None:
            stages["bbox_roi_extractor"] = res["bbox_feats"]
            stages["bbox_head.cls_score"] = res["cls_score"]
            stages["bbox_head.bbox_pred"] = res["bbox_pred"]
        counts = [len(p["bboxes"]) for p in proposals]
        rois_l = rois.split(counts, 0)
        cls_l = res["cls_score"].split(counts, 0)
        reg_l = res["bbox_pred"].split(counts, 0)
        bbox_rescale = rescale and not self.with_mask
        results = []
        for r, c, b, meta in zip(rois_l, cls_l, reg_l, img_metas):
            if r.shape[0] == 0:
                results.append(self._empty(meta))
                continue
            bboxes, scores, labels = self.bbox_head.predict_single(r, c, b, meta, cfg, bbox_rescale)
            results.append(dict(bboxes=bboxes, scores=scores, labels=labels))
        if self.with_mask:
            results = self.predict_mask(x, img_metas, results, rescale, stages)
        return results

    def predict_mask(self, x, img_metas, results, rescale, stages=None):
        mask_rois = bbox2roi([r["bboxes"] for r in results])
        if mask_rois.shape[0] == 0:
            for r, m in zip(results, img_metas):
                r["masks"] = torch.zeros(0, *self._canvas(m, rescale), dtype=torch.bool)
            return results
        res = self._mask_forward(x, mask_rois)
        if stages is not None:
            stages["mask_roi_extractor"] = res["mask_feats"]
            stages["mask_head.mask_preds"] = res["mask_preds"]
        preds = res["mask_preds"].split([len(r["bboxes"]) for r in results], 0)
        for r, p, meta in zip(results, preds, img_metas):
            if len(r["bboxes"]) == 0:
                r["masks"] = torch.zeros(0, *self._canvas(meta, rescale), dtype=torch.bool)
                continue
            r["masks"], r["bboxes"] = self.mask_head.predict_single(p, r["bboxes"], r["labels"], meta,
                                                                    self.test_cfg, rescale)
        return results

    @staticmethod
    def _canvas(meta, rescale):
        h, w = meta["ori_shape"][:2]
        if rescale:
            return h, w
        sf = list(meta["scale_factor"])
        return int(round(h * sf[1])), int(round(w * sf[0]))

    def _empty(self, meta):
        out = dict(bboxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))
        if self.with_mask:
            out["masks"] = torch.zeros(0, *meta["ori_shape"][:2], dtype=torch.bool)
        return out
