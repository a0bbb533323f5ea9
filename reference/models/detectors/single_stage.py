"""SingleStageDetector (visdet ``models/detectors/single_stage.py``): data preprocessor, backbone, neck and one
dense ``bbox_head`` (handed the detector's train/test cfg by the config parser), predict path and the training
loss (``loss``; :func:`~flaxdet_reference.models.detectors.two_stage.parse_losses` gives the total)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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

    # -- training -----------------------------------------------------------------------------------
    def loss(self, images, img_metas, gt_instances, stages=None, **head_kwargs):
        """visdet's ``SingleStageDetector.loss`` on a batch: ``bbox_head.loss(extract_feat(batch))``.

        images: a list of (3,H,W) uint8 tensors in the loader's channel order (the data preprocessor runs; metas
        default ``img_shape`` to each image's size), or an already preprocessed (N,3,H,W) float batch (then
        ``img_metas`` need ``img_shape``). ``pad_shape`` defaults to ``img_shape`` rounded up to
        ``pad_size_divisor`` (visdet's per-image pad shape); ``batch_input_shape`` is the batch's. gt_instances:
        per image dict(bboxes (G,4) xyxy in the input frame, labels (G,)[, masks (G,h,w) bool/uint8: RTMDet-Ins,
        padded with ``mask_pad_value`` to the batch shape when ``pad_mask``]). ``head_kwargs`` go to the head's
        ``loss_by_feat`` (RTMDet-Ins: ``emulate_kernel_index_bug``). Returns visdet's raw loss dict
        (``loss_cls``/``loss_bbox`` lists over levels[, ``loss_mask``]); ``stages`` (a dict) receives the
        intermediates (see RTMDetHead's docstring) plus ``preprocessed``, ``metas`` and ``neck``."""
        pp = self.data_preprocessor.cfg
        if torch.is_tensor(images) and images.is_floating_point():
            batch, batch_shape = images, tuple(images.shape[-2:])
            sizes = [tuple(m["img_shape"])[:2] for m in img_metas]
        else:
            batch, batch_shape = self.data_preprocessor(images)
            sizes = [tuple(m.get("img_shape", img.shape[-2:]))[:2] for img, m in zip(images, img_metas)]
        d = pp.pad_size_divisor
        metas = [dict(img_shape=(int(h), int(w)), batch_input_shape=tuple(batch_shape),
                      pad_shape=tuple(m.get("pad_shape", (int(math.ceil(h / d)) * d, int(math.ceil(w / d)) * d)))[:2])
                 for (h, w), m in zip(sizes, img_metas)]
        gts = [self._gt_tensors(g, batch_shape) for g in gt_instances]
        x = self.extract_feat(batch)
        if stages is not None:
            stages.update(preprocessed=batch, metas=metas, neck=x)
        return self.bbox_head.loss(x, gts, metas, stages=stages, **head_kwargs)

    def _gt_tensors(self, gt, batch_shape):
        bboxes = torch.as_tensor(gt["bboxes"], dtype=torch.float32).reshape(-1, 4)
        out = dict(bboxes=bboxes, labels=torch.as_tensor(gt["labels"], dtype=torch.long).reshape(-1))
        if hasattr(self.bbox_head, "loss_mask_by_feat"):  # only the Ins head's GT carry masks (visdet's pipeline)
            masks = torch.as_tensor(gt["masks"]).to(torch.bool)
            masks = masks.reshape(len(bboxes), *masks.shape[-2:])
            pp = self.data_preprocessor.cfg
            if pp.pad_mask:  # visdet pads GT masks to the batch input shape (mask_pad_value)
                h, w = masks.shape[-2:]
                masks = F.pad(masks.to(torch.uint8), (0, batch_shape[1] - w, 0, batch_shape[0] - h),
                              value=pp.mask_pad_value).to(torch.bool)
            out["masks"] = masks
        return out
