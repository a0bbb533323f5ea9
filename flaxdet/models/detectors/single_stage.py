"""SingleStageDetector (visdet ``models/detectors/single_stage.py``): data_preprocessor, backbone, neck and a
dense ``bbox_head``, inference only.

``predict`` is one static-shape function of (images, img_shapes, scale_factors) -> padded detections, with the
conventions of :class:`~flaxdet.models.detectors.two_stage.TwoStageDetector` (so :class:`flaxdet.inference.Detector`
runs it): images (N, Hp, Wp, 3) uint8 padded to a multiple of ``pad_size_divisor``; dets ``bboxes`` (N, D, 4),
``scores``, ``labels``, ``valid`` with D = ``test_cfg.max_per_img``; a mask head adds ``masks`` (N, D, *canvas_hw).
"""
from __future__ import annotations

from flax import nnx

from flaxdet.models.data_preprocessors.data_preprocessor import DetDataPreprocessor
from flaxdet.models.dense_heads.rtmdet_head import RTMDetHead, RTMDetSepBNHead
from flaxdet.models.dense_heads.rtmdet_ins_head import RTMDetInsHead, RTMDetInsSepBNHead
from flaxdet.models.detectors.two_stage import BACKBONES, NECKS, _build

DENSE_HEADS = {"RTMDetHead": RTMDetHead, "RTMDetSepBNHead": RTMDetSepBNHead, "RTMDetInsHead": RTMDetInsHead,
               "RTMDetInsSepBNHead": RTMDetInsSepBNHead}


class SingleStageDetector(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.data_preprocessor = DetDataPreprocessor(cfg.data_preprocessor)
        self.backbone = _build(BACKBONES, cfg.backbone, "backbone", rngs)
        self.neck = _build(NECKS, cfg.neck, "neck", rngs) if cfg.neck is not None else None
        if cfg.bbox_head is None:
            raise ValueError(f"{cfg.TYPE}: bbox_head is required")
        self.bbox_head = _build(DENSE_HEADS, cfg.bbox_head, "bbox_head", rngs)

    @property
    def with_mask(self) -> bool:
        """The head predicts instance masks (``predict`` then needs ``canvas_hw``)."""
        return isinstance(self.bbox_head, RTMDetInsHead)

    def extract_feat(self, x):
        feats = self.backbone(x)
        return feats, (self.neck(feats) if self.neck is not None else feats)

    def predict(self, images, img_shapes, scale_factors, canvas_hw=None, rescale=True, with_stages=False):
        """images (N, Hp, Wp, 3) uint8 (in the loader's channel order, zero padded); img_shapes (N, 2) int (h, w);
        scale_factors (N, 2) or (N, 4) (w, h[, w, h]); ``canvas_hw`` (static): the mask canvas, at least every
        original size (mask heads with ``rescale``). Returns dict bboxes/scores/labels/valid [+ masks], and the
        stage dict (NHWC; visdet's golden names) when ``with_stages``."""
        x = self.data_preprocessor(images, img_shapes)
        feats, neck = self.extract_feat(x)
        stages = {"preprocessed": x}
        stages.update({f"backbone.{i}": f for i, f in enumerate(feats)})
        stages.update({f"neck.{i}": f for i, f in enumerate(neck)})
        dets, s = self.bbox_head.predict(neck, img_shapes, scale_factors, canvas_hw, rescale)
        stages.update(s)
        stages.update({f"det.{k}": v for k, v in dets.items()})
        return (dets, stages) if with_stages else dets
