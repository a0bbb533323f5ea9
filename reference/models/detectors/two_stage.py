"""TwoStageDetector / FasterRCNN / MaskRCNN (visdet ``models/detectors/two_stage.py``): predict path and
the training loss (``loss``), with visdet's ``parse_losses``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flaxdet.config import TwoStageDetectorCfg
from flaxdet_reference.models.backbones.cspnext import CSPNeXt
from flaxdet_reference.models.backbones.resnet import ResNet, ResNeXt
from flaxdet_reference.models.backbones.swin import SwinTransformer
from flaxdet_reference.models.data_preprocessors.data_preprocessor import DetDataPreprocessor
from flaxdet_reference.models.dense_heads.rpn_head import RPNHead
from flaxdet_reference.models.necks.cspnext_pafpn import CSPNeXtPAFPN
from flaxdet_reference.models.necks.fpn import FPN
from flaxdet_reference.models.roi_heads.cascade_roi_head import CascadeRoIHead
from flaxdet_reference.models.roi_heads.standard_roi_head import StandardRoIHead

BACKBONES = {"ResNet": ResNet, "ResNeXt": ResNeXt, "SwinTransformer": SwinTransformer, "CSPNeXt": CSPNeXt}
NECKS = {"FPN": FPN, "CSPNeXtPAFPN": CSPNeXtPAFPN}
RPN_HEADS = {"RPNHead": RPNHead}
ROI_HEADS = {"StandardRoIHead": StandardRoIHead, "CascadeRoIHead": CascadeRoIHead}


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

    # -- training -----------------------------------------------------------------------------------
    def loss(self, images, img_metas, gt_instances, inject=None, generator=None, stages=None):
        """visdet's ``TwoStageDetector.loss`` on a batch, from the data preprocessor on.

        images: list of (3,H,W) uint8 tensors (BGR as loaded); img_metas: dicts with ``img_shape`` (h, w)
        (default: the image size); gt_instances: per image dict(bboxes (k,4) float, labels (k,) long[,
        masks (k,h,w) uint8]) in the network-input frame. Randomness: ``generator`` (a torch.Generator;
        None = the global RNG, as visdet) or ``inject`` = dict(rpn=[per image dict(pos_inds, neg_inds)
        into its valid-anchor list], rcnn=[... into [GTs; proposals]], proposals=[per image (P_i, 4)]),
        any part optional. Returns visdet's raw loss dict (``loss_rpn_cls``/``loss_rpn_bbox`` lists over
        levels; ``loss_cls``, ``acc``, ``loss_bbox``, ``loss_mask``): :func:`parse_losses` gives the total
        and the log. ``stages`` (a dict) receives the intermediates.
        """
        if self.cfg.train_cfg is None:
            raise ValueError("this model config has no train_cfg: it cannot compute training losses")
        inject = inject or {}
        batch, batch_shape = self.data_preprocessor(images)
        d = self.data_preprocessor.cfg.pad_size_divisor
        metas = []
        for img, m in zip(images, img_metas):
            h, w = img.shape[-2:]
            metas.append(dict(img_shape=tuple(m.get("img_shape", (h, w)))[:2], batch_input_shape=batch_shape,
                              pad_shape=(int(math.ceil(h / d)) * d, int(math.ceil(w / d)) * d)))
        gts = [self._gt_tensors(g, batch_shape) for g in gt_instances]
        x = self.extract_feat(batch)
        if stages is not None:
            stages.update(preprocessed=batch, metas=metas, neck=x)
        rpn_gts = [dict(g, labels=torch.zeros_like(g["labels"])) for g in gts]  # RPN: one foreground class
        proposal_cfg = self.cfg.train_cfg.rpn_proposal or self.cfg.test_cfg.rpn
        losses, proposals = self.rpn_head.loss_and_predict(x, rpn_gts, metas, proposal_cfg, generator,
                                                           inject.get("rpn"), stages)
        if stages is not None:
            stages["rpn_proposals"] = proposals
        if "proposals" in inject:  # teacher forcing: given train-mode proposals
            proposals = [dict(bboxes=torch.as_tensor(p, dtype=torch.float32)[:, :4]) for p in inject["proposals"]]
        if stages is not None:
            stages["proposals"] = proposals
        losses.update(self.roi_head.loss(x, proposals, gts, generator, inject.get("rcnn"), stages))
        return losses

    def _gt_tensors(self, gt, batch_shape):
        bboxes = torch.as_tensor(gt["bboxes"], dtype=torch.float32).reshape(-1, 4)
        out = dict(bboxes=bboxes, labels=torch.as_tensor(gt["labels"], dtype=torch.long).reshape(-1))
        if getattr(self.roi_head, "with_mask", False):
            masks = torch.as_tensor(gt["masks"]).to(torch.uint8)
            masks = masks.reshape(len(bboxes), *masks.shape[-2:])
            pp = self.data_preprocessor.cfg
            if pp.pad_mask:  # visdet pads GT masks to the batch input shape (mask_pad_value)
                h, w = masks.shape[-2:]
                masks = F.pad(masks, (0, batch_shape[1] - w, 0, batch_shape[0] - h), value=pp.mask_pad_value)
            out["masks"] = masks
        return out


def parse_losses(losses):
    """visdet ``BaseModel.parse_losses``: each entry's mean (lists: the sum of their means); the total
    is the sum of the entries whose key contains "loss". Returns (total, log dict with "loss" first)."""
    log_vars = []
    for name, value in losses.items():
        if isinstance(value, torch.Tensor):
            log_vars.append([name, value.mean()])
        else:
            log_vars.append([name, sum(v.mean() for v in value)])
    total = sum(v for k, v in log_vars if "loss" in k)
    return total, dict([["loss", total]] + log_vars)


class FasterRCNN(TwoStageDetector):
    pass


class MaskRCNN(TwoStageDetector):
    pass
