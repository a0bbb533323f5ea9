"""CascadeRoIHead (visdet ``roi_heads/cascade_roi_head.py``), static-shape predict path.

Per stage k: ``bbox_roi_extractor.k`` + ``bbox_head.k`` on the current RoIs (padded proposals, (N, P, 4));
between stages the RoIs are regressed by stage k's head with the argmax foreground class (visdet's
``regress_by_class``: the stage's coder stds, clipped to ``img_shape``). Detections: the mean of the stages'
raw logits, softmax + decode + multiclass NMS with the last head on the RoIs it saw. Masks: every stage's
mask head on the detections, sigmoid probabilities averaged (``merge_aug_masks``), pasted by the last mask
head with ``activate_map=True``. Attribute names are visdet's (``roi_head.bbox_head.0`` ...), so the
converter maps the checkpoint by name.

Training (visdet ``CascadeRoIHead.loss``): stage k assigns and samples with ``train_cfg[k]`` (GTs prepended
as candidates), computes its box and mask losses with ``bbox_head.k`` / ``mask_head.k``, logs them as
``s{k}.{name}`` weighted by ``stage_loss_weights[k]`` (``acc`` is not weighted), and hands its sampled rows,
regressed without gradient (:meth:`CascadeRoIHead.refine` with the sampled labels, MMDetection 3.x
``BBoxHead.refine_bboxes``: visdet's own training path crashes there, see
``flaxdet_reference.models.roi_heads.cascade_roi_head``), to stage k+1 as proposals: positives regress with
their GT class, negatives with the argmax foreground class, clipped to ``img_shape``; positives that were GT
boxes are dropped. Static shapes: stage k+1's proposals are stage k's S sampled rows (N, S, 4), the dropped
and padded rows marked invalid.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.config import CascadeRoIHeadCfg
from flaxdet.fast_paths.mask_head_chunks import run_mask_head
from flaxdet.fast_paths.mask_rows import mask_buckets, pad_rows, run_mask_rows
from flaxdet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from flaxdet.models.roi_heads.roi_extractors.single_level_roi_extractor import SingleRoIExtractor
from flaxdet.models.roi_heads.standard_roi_head import (
    BBOX_HEADS,
    assign_and_sample,
    bbox2roi,
    bbox_loss_by,
    mask_loss_by,
    sampler_spos,
)
from flaxdet.models.task_modules.coders.delta_xywh_bbox_coder import decode_deltas


def regress_by_class(bbox_head, boxes, labels, bbox_pred, img_shape):
    """visdet ``BBoxHead.regress_by_class`` for one image: boxes (R, 4), labels (R,), bbox_pred (R, 4 or
    4 * C) -> (R, 4) decoded with the head's coder, clipped to ``img_shape``."""
    if not bbox_head.cfg.reg_class_agnostic:
        bbox_pred = jnp.take_along_axis(bbox_pred.reshape(-1, bbox_head.num_classes, 4),
                                        labels[:, None, None].astype(jnp.int32), 1)[:, 0]
    bc = bbox_head.cfg.bbox_coder
    return decode_deltas(boxes, bbox_pred.reshape(-1, 4), bc.target_means, bc.target_stds, max_shape=img_shape,
                         wh_ratio_clip=bc.wh_ratio_clip)


class CascadeRoIHead(nnx.Module):
    def __init__(self, cfg: CascadeRoIHeadCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.num_stages = cfg.num_stages
        self.bbox_roi_extractor = nnx.List([SingleRoIExtractor(c) for c in cfg.bbox_roi_extractor])
        self.bbox_head = nnx.List([BBOX_HEADS[c.TYPE](c, rngs=rngs) for c in cfg.bbox_head])
        self.with_mask = cfg.mask_head is not None
        if self.with_mask:
            # visdet shares the bbox extractors when mask_roi_extractor is None; they hold no parameters,
            # so separate instances of the same configs are equivalent
            ext = cfg.mask_roi_extractor if cfg.mask_roi_extractor is not None else cfg.bbox_roi_extractor
            self.mask_roi_extractor = nnx.List([SingleRoIExtractor(c) for c in ext])
            self.mask_head = nnx.List([FCNMaskHead(c, rngs=rngs) for c in cfg.mask_head])

    def bbox_forward(self, stage, feats, rois):
        roi_feats = self.bbox_roi_extractor[stage](feats, rois)
        cls, reg = self.bbox_head[stage](roi_feats)
        return roi_feats, cls, reg

    def mask_forward(self, stage, feats, rois):
        roi_feats = self.mask_roi_extractor[stage](feats, rois)
        return roi_feats, self.mask_head[stage](roi_feats)

    def refine(self, stage, boxes, cls, reg, img_shapes, labels=None):
        """Boxes (N, R, 4) regressed by stage ``stage``'s head: cls (N*R, C+1), reg (N*R, ...) -> (N, R, 4).
        Each row uses its ``labels`` (N, R) class, or where that is the background class (or without
        ``labels``, visdet's ``_refine_roi`` at test time) the argmax foreground class."""
        n, r, _ = boxes.shape
        fg = jnp.argmax(cls[:, :-1], axis=-1).reshape(n, r)
        labels = fg if labels is None else jnp.where(labels == self.bbox_head[stage].num_classes, fg, labels)
        fn = partial(regress_by_class, self.bbox_head[stage])
        return jax.vmap(fn)(boxes, labels, reg.reshape(n, r, -1), img_shapes)

    def loss(self, feats, proposals, proposal_valid, batch, key, inject=None, mask_rows=None):
        """Returns (logs ``s{k}.*``, stage arrays (``s{k}.``-prefixed, stage 0's also unprefixed), stage 0's
        sampled rows, the mask rows per image the stages needed (0 without masks)). ``inject``: a list of
        per-stage sampler injections."""
        keys = jax.random.split(key, self.num_stages)
        logs, stages, first, need = {}, {}, None, jnp.zeros((), jnp.int32)
        boxes, valid = proposals, proposal_valid
        for k in range(self.num_stages):
            cfg, w = self.cfg.train_cfg[k], self.cfg.stage_loss_weights[k]
            s = assign_and_sample(cfg, self.bbox_head[k].num_classes, boxes, valid, batch, keys[k],
                                  None if inject is None else inject[k])
            rl, st = self.bbox_loss(k, feats, s, batch)
            if self.with_mask:
                rl["loss_mask"], ms, nk = self.mask_loss(k, feats, s, batch, mask_rows)
                need = jnp.maximum(need, nk)
                st.update(ms)
            logs.update({f"s{k}.{name}": v * w if "loss" in name else v for name, v in rl.items()})
            st.update(proposals=boxes, proposals_valid=valid, rcnn_assigned=s["assigned"], rcnn_sample_rows=s["inds"],
                      rcnn_sample_valid=s["valid"], rcnn_is_pos=s["is_pos"], rcnn_is_gt=s["is_gt"])
            stages.update({f"s{k}.{name}": v for name, v in st.items()})
            if k == 0:
                first = s
                stages.update({name: v for name, v in st.items() if not name.startswith(("proposals", "rcnn_is"))})
            if k < self.num_stages - 1:
                sg = jax.lax.stop_gradient
                boxes = sg(self.refine(k, s["rois"], sg(st["rcnn_cls_score"]), sg(st["rcnn_bbox_pred"]),
                                       batch["img_shapes"], s["labels"]))
                valid = s["valid"] & ~(s["is_pos"] & s["is_gt"])
        return logs, stages, first, need

    def bbox_loss(self, stage, feats, sample, batch):
        return bbox_loss_by(partial(self.bbox_forward, stage), self.bbox_head[stage], self.cfg.train_cfg[stage],
                            feats, sample, batch)

    def mask_loss(self, stage, feats, sample, batch, rows=None):
        return mask_loss_by(self.mask_roi_extractor[stage], self.mask_head[stage], self.cfg.train_cfg[stage], feats,
                            sample, batch, rows)

    def mask_row_buckets(self):
        """The training mask branch's static row counts per image (Spos the largest over the stages)."""
        return mask_buckets(max(sampler_spos(c) for c in self.cfg.train_cfg)) if self.with_mask else None

    def predict_bbox(self, feats, proposals, proposal_valid, img_shapes, scale_factors, rescale):
        """Returns (dets dict with (N, D, ...) arrays, stage dict). Stage names: stage 0 as
        StandardRoIHead's, later stages ``cascade.rois.k`` / ``cascade.bbox_roi_extractor.k`` /
        ``cascade.bbox_head.k.{cls_score,bbox_pred}``, the averaged logits ``cascade.cls_score``."""
        n, p, _ = proposals.shape
        boxes, total, stages = proposals, None, {}
        for s in range(self.num_stages):
            roi_feats, cls, reg = self.bbox_forward(s, feats, bbox2roi(boxes))
            if s == 0:
                stages.update({"bbox_roi_extractor": roi_feats, "bbox_head.cls_score": cls,
                               "bbox_head.bbox_pred": reg})
            else:
                stages.update({f"cascade.rois.{s}": boxes.reshape(n * p, 4),
                               f"cascade.bbox_roi_extractor.{s}": roi_feats,
                               f"cascade.bbox_head.{s}.cls_score": cls, f"cascade.bbox_head.{s}.bbox_pred": reg})
            total = cls if total is None else total + cls  # visdet: sum over stages in order, / num_stages
            if s < self.num_stages - 1:
                boxes = self.refine(s, boxes, cls, reg, img_shapes)
        cls = total / float(self.num_stages)
        stages["cascade.cls_score"] = cls
        bbox_rescale = rescale and not self.with_mask
        fn = lambda r, v, c, b, sh, f: self.bbox_head[-1].predict_single(  # noqa: E731
            r, v, c, b, sh, f, self.cfg.test_cfg, bbox_rescale)
        boxes, scores, labels, valid = jax.vmap(fn)(boxes, proposal_valid, cls.reshape(n, p, -1),
                                                     reg.reshape(n, p, -1), img_shapes, scale_factors)
        return dict(bboxes=boxes, scores=scores, labels=labels, valid=valid), stages

    def predict_mask(self, feats, dets, scale_factors, canvas_hw, rescale=True, rows=None):
        """As ``StandardRoIHead.predict_mask`` (invalid rows skipped, mask heads + paste on ``rows``
        rows per image, or a ``lax.switch`` over ``mask_buckets(D)`` with ``rows=None``), with every
        stage's mask head and their probabilities averaged.
        RoI features are computed once per distinct extractor config (visdet's per-stage instances of
        one config give the same features)."""
        n, d, _ = dets["bboxes"].shape
        thr = self.cfg.test_cfg.mask_thr_binary
        rois, rvalid = bbox2roi(dets["bboxes"]), dets["valid"].reshape(-1)
        by_cfg, roi_feats = {}, []
        for s in range(self.num_stages):
            ext = self.mask_roi_extractor[s]
            if ext.cfg not in by_cfg:
                by_cfg[ext.cfg] = ext(feats, rois, valid=rvalid)
            roi_feats.append(by_cfg[ext.cfg])
        per_image = [f.reshape(n, d, *f.shape[1:]) for f in roi_feats]

        def run(k):
            logits = [run_mask_head(self.mask_head[s], per_image[s][:, :k].reshape(n * k, *per_image[s].shape[2:]))
                      for s in range(self.num_stages)]
            probs = jax.nn.sigmoid(logits[0])
            for lg in logits[1:]:
                probs = probs + jax.nn.sigmoid(lg)
            probs = probs / float(self.num_stages) if self.num_stages > 1 else probs
            head = self.mask_head[-1]
            fn = lambda pr, b, lab, sf: head.predict_single(pr, b, lab, sf, canvas_hw, thr, rescale,  # noqa: E731
                                                            activate_map=True)
            masks, boxes = jax.vmap(fn)(probs.reshape(n, k, *probs.shape[1:]), dets["bboxes"][:, :k],
                                        dets["labels"][:, :k], scale_factors)
            return (pad_rows(masks, n, d), pad_rows(boxes, n, d), tuple(pad_rows(lg, n, d, flat=True) for lg in logits),
                    pad_rows(probs, n, d, flat=True))

        masks, boxes, logits, probs = run_mask_rows(run, d, dets["valid"], rows)
        masks = masks & dets["valid"][:, :, None, None]
        out = dict(dets, bboxes=jnp.where(dets["valid"][..., None], boxes, 0), masks=masks)
        stages = {"mask_roi_extractor": roi_feats[0], "mask_head.mask_preds": logits[0], "cascade.mask_probs": probs}
        stages.update({f"cascade.mask_head.{s}.mask_preds": logits[s] for s in range(1, self.num_stages)})
        return out, stages
