"""SingleStageDetector (visdet ``models/detectors/single_stage.py``): data_preprocessor, backbone, neck and a
dense ``bbox_head``; :meth:`~SingleStageDetector.predict` and the training :meth:`~SingleStageDetector.loss`.

``predict`` is one static-shape function of (images, img_shapes, scale_factors) -> padded detections, with the
conventions of :class:`~flaxdet.models.detectors.two_stage.TwoStageDetector` (so :class:`flaxdet.inference.Detector`
runs it): images (N, Hp, Wp, 3) uint8 padded to a multiple of ``pad_size_divisor``; dets ``bboxes`` (N, D, 4),
``scores``, ``labels``, ``valid`` with D = ``test_cfg.max_per_img``; a mask head adds ``masks`` (N, D, *canvas_hw).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flaxdet.fast_paths.image_loop import per_image
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

    def mask_row_buckets(self):
        """The training mask branch's static row counts per image, or None (no mask branch, or every row)."""
        return self.bbox_head.mask_row_buckets()

    def loss(self, batch, key=None, inject=None, with_stages=False, mask_rows=None):
        """Total loss and visdet's log dict (``loss_cls``, ``loss_bbox`` -- visdet's per-level lists summed, as its
        ``parse_losses`` does -- ``loss_mask`` with a mask head, ``loss``). ``batch`` as the two-stage family's
        (:func:`flaxdet.data.transforms.pad_ground_truth` plus images, img_shapes, pad_shapes); the GT masks
        (N, G, Hp, Wp) are read by mask heads only. Nothing is random (``key``, ``inject`` unused: the assigner is
        deterministic). ``mask_rows`` (static): positives per image the mask loss runs on (None: all priors); the
        logs then hold ``mask_rows_needed``. BN layers in train mode (:func:`flaxdet.nn.set_bn_training`) update
        their running statistics in place. Returns (total, logs) or, ``with_stages``, (total, (logs, stages))."""
        del key, inject
        x = self.data_preprocessor(batch["images"], batch["img_shapes"])
        feats, neck = self.extract_feat(x)
        losses, extra = self.bbox_head.loss(neck, batch, mask_rows)
        logs = {k: (sum(v) if isinstance(v, list) else v) for k, v in losses.items()}
        total = sum(logs.values())
        logs["loss"] = total
        if mask_rows is not None and "mask_rows_needed" in extra:
            logs["mask_rows_needed"] = extra["mask_rows_needed"].astype(jnp.int32)
        if not with_stages:
            return total, logs
        stages = {"preprocessed": x}
        stages.update({f"backbone.{i}": f for i, f in enumerate(feats)})
        stages.update({f"neck.{i}": f for i, f in enumerate(neck)})
        for name, v in losses.items():
            if isinstance(v, list):
                stages.update({f"{name}.{lvl}": t for lvl, t in enumerate(v)})
        stages.update({k: v for k, v in extra.items() if k != "bounds"})
        return total, (logs, stages)

    def extract_feat(self, x):
        feats = self.backbone(x)
        return feats, (self.neck(feats) if self.neck is not None else feats)

    def _trunk(self, images, img_shapes):
        """Inference: (preprocessed, (backbone outputs, neck outputs)); image by image on the ``image_loop`` fast
        path (:func:`flaxdet.fast_paths.image_loop.per_image`)."""
        x = self.data_preprocessor(images, img_shapes)
        return x, self.extract_feat(x)

    def predict(self, images, img_shapes, scale_factors, canvas_hw=None, rescale=True, with_stages=False):
        """images (N, Hp, Wp, 3) uint8 (in the loader's channel order, zero padded); img_shapes (N, 2) int (h, w);
        scale_factors (N, 2) or (N, 4) (w, h[, w, h]); ``canvas_hw`` (static): the mask canvas, at least every
        original size (mask heads with ``rescale``). Returns dict bboxes/scores/labels/valid [+ masks], and the
        stage dict (NHWC; visdet's golden names) when ``with_stages``."""
        x, (feats, neck) = per_image(self._trunk, images, img_shapes)
        stages = {"preprocessed": x}
        stages.update({f"backbone.{i}": f for i, f in enumerate(feats)})
        stages.update({f"neck.{i}": f for i, f in enumerate(neck)})
        dets, s = self.bbox_head.predict(neck, img_shapes, scale_factors, canvas_hw, rescale)
        stages.update(s)
        stages.update({f"det.{k}": v for k, v in dets.items()})
        return (dets, stages) if with_stages else dets
