"""StandardRoIHead (visdet ``roi_heads/standard_roi_head.py``), test path."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import StandardRoIHeadCfg
from flaxdet_reference.models.roi_heads.bbox_heads.convfc_bbox_head import (
    ConvFCBBoxHead, Shared2FCBBoxHead, Shared4Conv1FCBBoxHead)
from flaxdet_reference.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from flaxdet_reference.models.roi_heads.roi_extractors.single_level_roi_extractor import SingleRoIExtractor

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
