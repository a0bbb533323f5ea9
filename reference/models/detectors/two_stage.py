"""TwoStageDetector / FasterRCNN / MaskRCNN (visdet ``models/detectors/two_stage.py``), predict path."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import TwoStageDetectorCfg
from flaxdet_reference.models.backbones.resnet import ResNet
from flaxdet_reference.models.data_preprocessors.data_preprocessor import DetDataPreprocessor
from flaxdet_reference.models.dense_heads.rpn_head import RPNHead
from flaxdet_reference.models.necks.fpn import FPN
from flaxdet_reference.models.roi_heads.standard_roi_head import StandardRoIHead

BACKBONES = {"ResNet": ResNet}
NECKS = {"FPN": FPN}
RPN_HEADS = {"RPNHead": RPNHead}
ROI_HEADS = {"StandardRoIHead": StandardRoIHead}


def _build(table, cfg, what):
    if cfg.TYPE not in table:
        raise ValueError(f"{what} type {cfg.TYPE!r} is not supported by the reference (have {sorted(table)})")
    return table[cfg.TYPE](cfg)


class TwoStageDetector(nn.Module):
    def __init__(self, cfg: TwoStageDetectorCfg):
        super().__init__()
        self.cfg = cfg
        self.data_preprocessor = DetDataPreprocessor(cfg.data_preprocessor)
        self.backbone = _build(BACKBONES, cfg.backbone, "backbone")
        if cfg.neck is not None:
            self.neck = _build(NECKS, cfg.neck, "neck")
        if cfg.rpn_head is not None:
            self.rpn_head = _build(RPN_HEADS, cfg.rpn_head, "rpn_head")
        if cfg.roi_head is not None:
            self.roi_head = _build(ROI_HEADS, cfg.roi_head, "roi_head")

    @property
    def with_neck(self):
        return hasattr(self, "neck")

    def extract_feat(self, batch_inputs):
        x = self.backbone(batch_inputs)
        return self.neck(x) if self.with_neck else x

    @torch.no_grad()
    def predict(self, images, img_metas, rescale=True, proposals=None, stages=None):
        """images: list of (3,H,W) uint8 BGR tensors (already resized); img_metas: dicts with
        ``ori_shape`` (h,w), ``img_shape`` (h,w), ``scale_factor`` (w,h[,w,h]).

        Returns per-image dicts (bboxes, scores, labels[, masks]); if ``stages`` is a dict it is
        filled with every intermediate, keyed like the goldens (``backbone.0`` ...).
        """
        batch, batch_shape = self.data_preprocessor(images)
        metas = [dict(m, batch_input_shape=batch_shape) for m in img_metas]
        feats = self.backbone(batch)
        neck = self.neck(feats) if self.with_neck else feats
        if stages is not None:
            stages["preprocessed"] = batch
            stages.update({f"backbone.{i}": f for i, f in enumerate(feats)})
            stages.update({f"neck.{i}": f for i, f in enumerate(neck)})
        return self.predict_heads(neck, metas, rescale=rescale, proposals=proposals, stages=stages)

    @torch.no_grad()
    def predict_heads(self, neck, img_metas, rescale=True, proposals=None, stages=None):
        """RPN (unless ``proposals`` is given) and RoI head on given FPN features -- the entry
        point for teacher-forced parity checks. ``img_metas`` need ``batch_input_shape``."""
        if proposals is None:
            cls_scores, bbox_preds = self.rpn_head(neck)
            if stages is not None:
                for lvl, (c, b) in enumerate(zip(cls_scores, bbox_preds)):
                    stages[f"rpn_head.cls_score.{lvl}"] = c
                    stages[f"rpn_head.bbox_pred.{lvl}"] = b
            proposals = self.rpn_head.predict_by_feat(cls_scores, bbox_preds, img_metas,
                                                      self.rpn_head.cfg.test_cfg)
        if stages is not None:
            stages["proposals.bboxes"] = proposals[0]["bboxes"]
            stages["proposals.scores"] = proposals[0]["scores"]
        results = self.roi_head.predict(neck, proposals, img_metas, rescale=rescale, stages=stages)
        if stages is not None:
            for k, v in results[0].items():
                stages[f"det.{k}"] = v
        return results


class FasterRCNN(TwoStageDetector):
    pass


class MaskRCNN(TwoStageDetector):
    pass
