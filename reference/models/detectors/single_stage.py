"""SingleStageDetector (visdet ``models/detectors/single_stage.py``): data preprocessor, backbone, neck and one
dense ``bbox_head`` (handed the detector's train/test cfg by the config parser), predict path."""
from __future__ import annotations

import torch
from torch import nn

from flaxdet_reference.models.data_preprocessors.data_preprocessor import DetDataPreprocessor
from flaxdet_reference.models.dense_heads.rtmdet_head import RTMDetSepBNHead
from flaxdet_reference.models.dense_heads.rtmdet_ins_head import RTMDetInsSepBNHead
from flaxdet_reference.models.detectors.two_stage import BACKBONES, NECKS, _build

HEADS = {"RTMDetSepBNHead": RTMDetSepBNHead, "RTMDetInsSepBNHead": RTMDetInsSepBNHead}


class SingleStageDetector(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.data_preprocessor = DetDataPreprocessor(cfg.data_preprocessor)
        self.backbone = _build(BACKBONES, cfg.backbone, "backbone")
        if cfg.neck is not None:
            self.neck = _build(NECKS, cfg.neck, "neck")
        if cfg.bbox_head is None:
            raise ValueError(f"{type(self).__name__} needs a bbox_head")
        self.bbox_head = _build(HEADS, cfg.bbox_head, "bbox_head")

    @property
    def with_neck(self):
        return hasattr(self, "neck")

    def extract_feat(self, batch_inputs):
        x = self.backbone(batch_inputs)
        return self.neck(x) if self.with_neck else x

    @torch.no_grad()
    def predict(self, images, img_metas, rescale=True, stages=None):
        """images: list of (3,H,W) uint8 tensors in the loader's channel order (already resized); img_metas:
        dicts with ``ori_shape`` (h,w), ``img_shape`` (h,w), ``scale_factor`` (w,h) or (w,h,w,h).

        Returns per-image dicts (bboxes, scores, labels[, priors, kernels, masks]); if ``stages`` is a dict it
        is filled with every intermediate of the first image, keyed like the goldens (``backbone.0`` ...)."""
        batch, batch_shape = self.data_preprocessor(images)
        metas = [dict(m, batch_input_shape=batch_shape) for m in img_metas]
        feats = self.backbone(batch)
        x = self.neck(feats) if self.with_neck else feats
        if stages is not None:
            stages["preprocessed"] = batch
            stages.update({f"backbone.{i}": f for i, f in enumerate(feats)})
            stages.update({f"neck.{i}": f for i, f in enumerate(x)})
        return self.predict_heads(x, metas, rescale=rescale, stages=stages)

    @torch.no_grad()
    def predict_heads(self, x, img_metas, rescale=True, stages=None):
        """The head and its post-processing on given neck features (teacher-forced parity entry point)."""
        results = self.bbox_head.predict(x, img_metas, rescale=rescale, stages=stages)
        if stages is not None:
            stages.update({f"det.{k}": v for k, v in results[0].items()})
        return results
