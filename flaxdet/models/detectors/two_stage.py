"""TwoStageDetector / FasterRCNN / MaskRCNN (visdet ``models/detectors/two_stage.py``).

``loss`` is visdet's training forward (``TwoStageDetector.loss`` + ``parse_losses``): RPN losses
(``rpn_head.loss_by_feat``), train-mode proposals without gradient, the RoI head's ``loss``; the total is the
sum of every logged value whose name contains ``loss``.

``predict`` is one static-shape function of (images, img_shapes, scale_factors) -> padded detections,
meant to run under ``nnx.jit``/``jax.jit``. Static shapes: the batch's padded size (a multiple of
``pad_size_divisor`` -- visdet's own padding, so it is also the shape bucket), proposals per image
(``test_cfg.rpn.max_per_img``), detections per image (``test_cfg.rcnn.max_per_img``) and the mask
canvas (``canvas_hw``). Every padded output carries a ``valid`` mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.config import TwoStageDetectorCfg
from flaxdet.fast_paths.image_loop import per_image
from flaxdet.models.backbones.cspnext import CSPNeXt
from flaxdet.models.backbones.resnet import ResNet, ResNeXt
from flaxdet.models.backbones.swin import SwinTransformer
from flaxdet.models.data_preprocessors.data_preprocessor import DetDataPreprocessor
from flaxdet.models.dense_heads.rpn_head import RPNHead
from flaxdet.models.necks.cspnext_pafpn import CSPNeXtPAFPN
from flaxdet.models.necks.fpn import FPN
from flaxdet.models.roi_heads.cascade_roi_head import CascadeRoIHead
from flaxdet.models.roi_heads.standard_roi_head import StandardRoIHead

BACKBONES = {"ResNet": ResNet, "ResNeXt": ResNeXt, "SwinTransformer": SwinTransformer, "CSPNeXt": CSPNeXt}
NECKS = {"FPN": FPN, "CSPNeXtPAFPN": CSPNeXtPAFPN}
RPN_HEADS = {"RPNHead": RPNHead}
ROI_HEADS = {"StandardRoIHead": StandardRoIHead, "CascadeRoIHead": CascadeRoIHead}


def _build(table, cfg, what, rngs):
    if cfg.TYPE not in table:
        raise ValueError(f"{what} type {cfg.TYPE!r} is not supported by flaxdet (have {sorted(table)})")
    return table[cfg.TYPE](cfg, rngs=rngs)


def _stochastic_backbone(cfg):
    return any(getattr(cfg, f, 0) > 0 for f in ("drop_path_rate", "drop_rate", "attn_drop_rate"))


class TwoStageDetector(nnx.Module):
    def __init__(self, cfg: TwoStageDetectorCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.data_preprocessor = DetDataPreprocessor(cfg.data_preprocessor)
        self.backbone = _build(BACKBONES, cfg.backbone, "backbone", rngs)
        self.neck = _build(NECKS, cfg.neck, "neck", rngs) if cfg.neck is not None else None
        self.rpn_head = _build(RPN_HEADS, cfg.rpn_head, "rpn_head", rngs)
        self.roi_head = _build(ROI_HEADS, cfg.roi_head, "roi_head", rngs)

    def extract_feat(self, x, key=None):
        """``key``: training-time randomness of the backbone (Swin's drop-path / dropout); None = inference."""
        feats = self.backbone(x) if key is None else self.backbone(x, key=key)
        return feats, (self.neck(feats) if self.neck is not None else feats)

    def _trunk(self, images, img_shapes):
        """Inference: (preprocessed, (backbone outputs, neck outputs)); image by image on the ``image_loop`` fast
        path (:func:`flaxdet.fast_paths.image_loop.per_image`)."""
        x = self.data_preprocessor(images, img_shapes)
        return x, self.extract_feat(x)

    def mask_row_buckets(self):
        """The training mask branch's static row counts per image, or None without masks."""
        return self.roi_head.mask_row_buckets()

    def loss(self, batch, key, inject=None, with_stages=False, mask_rows=None):
        """Total loss and visdet's log dict (loss_rpn_cls, loss_rpn_bbox, loss_cls, acc, loss_bbox, loss_mask,
        loss; Cascade: ``s{k}.*`` per stage). ``batch``: images (N, Hp, Wp, 3) uint8, img_shapes / pad_shapes
        (N, 2), gt_bboxes (N, G, 4), gt_labels / gt_valid (N, G), gt_masks (N, G, Hp, Wp) (see
        :func:`flaxdet.data.transforms.pad_ground_truth`). ``key``: sampling (and Swin drop-path) randomness;
        ``inject``: recorded sampler draws (``rpn`` / ``rcnn``) and train proposals (``proposals``) to replay
        (the parity tests); ``mask_rows`` (static): the mask branch's rows per image (None: all; see
        :mod:`flaxdet.fast_paths.mask_rows`) -- when set, the logs also hold ``mask_rows_needed``.
        Returns (total, logs) or, ``with_stages``, (total, (logs, stage arrays))."""
        inject = inject or {}
        x = self.data_preprocessor(batch["images"], batch["img_shapes"])
        stochastic = _stochastic_backbone(self.backbone.cfg)
        _, neck = self.extract_feat(x, jax.random.fold_in(key, 0x5717) if stochastic else None)  # Swin drop-path
        cls, reg = self.rpn_head(neck)
        k1, k2 = jax.random.split(key)
        rpn_losses, rpn_t = self.rpn_head.loss_by_feat(cls, reg, batch, k1, inject.get("rpn"))
        logs = {name: sum(per_level) for name, per_level in rpn_losses.items()}
        sg = jax.lax.stop_gradient
        pb, ps, pv = self.rpn_head.predict_by_feat([sg(c) for c in cls], [sg(r) for r in reg], batch["img_shapes"],
                                                   self.cfg.train_cfg.rpn_proposal)
        if "proposals" in inject:  # teacher forcing: visdet's own train proposals
            pb, pv = inject["proposals"]
        rl, stages, s, need = self.roi_head.loss(neck, pb, pv, batch, k2, inject.get("rcnn"), mask_rows)
        logs.update(rl)
        total = sum(v for k, v in logs.items() if "loss" in k)
        logs["loss"] = total
        if mask_rows is not None:
            logs["mask_rows_needed"] = need.astype(jnp.int32)
        if not with_stages:
            return total, logs
        stages.update(train_proposals_boxes=pb, train_proposals_scores=ps, train_proposals_valid=pv,
                      rpn_per_level_cls=jnp.stack(rpn_losses["loss_rpn_cls"]),
                      rpn_per_level_bbox=jnp.stack(rpn_losses["loss_rpn_bbox"]),
                      rpn_avg_factor=rpn_t["avg_factor"].sum(), rpn_assigned=rpn_t["assigned"],
                      rcnn_assigned=s["assigned"], rcnn_sample_rows=s["inds"], rcnn_sample_valid=s["valid"])
        return total, (logs, stages)

    def predict(self, images, img_shapes, scale_factors, canvas_hw=None, rescale=True, with_stages=False):
        """images (N, Hp, Wp, 3) uint8 (BGR, zero padded); img_shapes (N, 2) int; scale_factors (N, 4).
        Returns dict bboxes/scores/labels/valid (N, D, ...) [+ masks (N, D, *canvas_hw)], and the
        stage dict when ``with_stages``."""
        x, (feats, neck) = per_image(self._trunk, images, img_shapes)
        stages = {"preprocessed": x}
        stages.update({f"backbone.{i}": f for i, f in enumerate(feats)})
        stages.update({f"neck.{i}": f for i, f in enumerate(neck)})
        dets, head_stages = self.predict_heads(neck, img_shapes, scale_factors, canvas_hw, rescale)
        stages.update(head_stages)
        return (dets, stages) if with_stages else dets

    def predict_boxes(self, images, img_shapes, scale_factors, rescale=True):
        """The detections before the mask branch and the FPN features it needs: (dets, neck). Boxes
        are in the network input's frame when the model has masks (``predict_mask`` rescales them)."""
        _, (_, neck) = per_image(self._trunk, images, img_shapes)
        dets, _ = self.predict_heads(neck, img_shapes, scale_factors, rescale=rescale, masks=False)
        return dets, neck

    def predict_heads(self, neck, img_shapes, scale_factors, canvas_hw=None, rescale=True, proposals=None,
                      masks=True):
        """RPN (unless ``proposals=(bboxes (N,P,4), valid (N,P))``) + RoI head on FPN features
        (``masks=False``: without the mask branch)."""
        stages = {}
        if proposals is None:
            cls, reg = per_image(self.rpn_head, neck)
            for lvl, (c, r) in enumerate(zip(cls, reg)):
                stages[f"rpn_head.cls_score.{lvl}"] = c
                stages[f"rpn_head.bbox_pred.{lvl}"] = r
            boxes, scores, valid = self.rpn_head.predict_by_feat(cls, reg, img_shapes)
            stages.update({"proposals.bboxes": boxes, "proposals.scores": scores, "proposals.valid": valid})
        else:
            boxes, valid = proposals
        dets, s = self.roi_head.predict_bbox(neck, boxes, valid, img_shapes, scale_factors, rescale)
        stages.update(s)
        if self.roi_head.with_mask and masks:
            if canvas_hw is None:
                raise ValueError("Mask R-CNN predict needs canvas_hw (the static mask canvas size)")
            dets, s = self.roi_head.predict_mask(neck, dets, scale_factors, canvas_hw, rescale)
            stages.update(s)
        stages.update({f"det.{k}": v for k, v in dets.items()})
        return dets, stages


class FasterRCNN(TwoStageDetector):
    pass


class MaskRCNN(TwoStageDetector):
    pass
