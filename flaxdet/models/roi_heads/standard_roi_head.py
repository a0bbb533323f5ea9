"""StandardRoIHead (visdet ``roi_heads/standard_roi_head.py``): static-shape predict and training paths.

Training glossary: N images, G padded GTs per image (``gt_valid``), P proposals per image, S = Spos + Sneg
sampled rows per image (``Spos = int(num * pos_fraction)``, ``Sneg = num``; at most ``num`` of them valid,
positives first). ``loss`` = visdet's: assign + sample per image (GTs prepended as candidates), bbox head
``loss_and_target`` on the sampled rows, mask head ``loss_and_target`` on the positives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.config import StandardRoIHeadCfg
from flaxdet.fast_paths.mask_head_chunks import run_mask_head
from flaxdet.fast_paths.mask_rows import mask_buckets, pad_rows, run_mask_rows
from flaxdet.models.roi_heads.bbox_heads.convfc_bbox_head import (
    ConvFCBBoxHead,
    Shared2FCBBoxHead,
    Shared4Conv1FCBBoxHead,
)
from flaxdet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from flaxdet.models.roi_heads.roi_extractors.single_level_roi_extractor import SingleRoIExtractor
from flaxdet.models.task_modules.assigners.max_iou_assigner import max_iou_assign
from flaxdet.models.task_modules.samplers.random_sampler import random_sample

BBOX_HEADS = {"ConvFCBBoxHead": ConvFCBBoxHead, "Shared2FCBBoxHead": Shared2FCBBoxHead,
              "Shared4Conv1FCBBoxHead": Shared4Conv1FCBBoxHead}


def bbox2roi(bboxes):
    """(N, P, 4) -> (N*P, 5) rows [batch_idx, x1, y1, x2, y2] (visdet ``bbox2roi`` on padded lists)."""
    n, p, _ = bboxes.shape
    idx = jnp.repeat(jnp.arange(n, dtype=bboxes.dtype), p)[:, None]
    return jnp.concatenate([idx, bboxes.reshape(n * p, 4)], axis=1)


def sampler_spos(train_cfg):
    """Spos: the sampled rows per image that can be positive (``int(num * pos_fraction)``)."""
    return int(train_cfg.sampler.num * train_cfg.sampler.pos_fraction)


def assign_and_sample(train_cfg, num_classes, proposals, prop_valid, batch, key, inject=None):
    """Per image: candidates [GT (G); proposals (P)] (GTs only with ``add_gt_as_proposals``), MaxIoU
    assignment, random sampling -> (N, S) sampled rows: ``rois`` (N, S, 4), ``valid``, ``is_pos``, ``is_gt``,
    ``gt_idx``, ``labels`` (background = ``num_classes``), and ``assigned`` / ``inds`` for the parity stages.
    ``inject``: per-image sampler indices to replay instead of drawing with ``key``."""
    g = batch["gt_bboxes"].shape[1]
    keys = jax.random.split(key, proposals.shape[0])
    a, smp = train_cfg.assigner, train_cfg.sampler

    def one(props, pv, gtb, gtl, gtv, k, inj):
        assigned_p, _ = max_iou_assign(props, pv, gtb, gtv, a.pos_iou_thr, a.neg_iou_thr, a.min_pos_iou,
                                       a.match_low_quality, a.gt_max_assign_all)
        if smp.add_gt_as_proposals:
            cands = jnp.concatenate([gtb, props])
            assigned = jnp.concatenate([jnp.where(gtv, jnp.arange(1, g + 1), -1), assigned_p])
            is_gt = jnp.concatenate([gtv, jnp.zeros_like(pv)])
        else:
            cands, assigned, is_gt = props, assigned_p, jnp.zeros_like(pv)
        sample = random_sample(assigned, smp.num, smp.pos_fraction, smp.neg_pos_ub, k, inj)
        inds = jnp.concatenate([sample["pos_inds"], sample["neg_inds"]])
        valid = jnp.concatenate([sample["pos_valid"], sample["neg_valid"]])
        is_pos = jnp.concatenate([sample["pos_valid"], jnp.zeros_like(sample["neg_valid"])])
        gt_idx = jnp.clip(assigned[inds] - 1, 0)
        labels = jnp.where(is_pos, gtl[gt_idx], num_classes)
        return dict(rois=cands[inds], valid=valid, is_pos=is_pos, gt_idx=gt_idx, labels=labels,
                    is_gt=is_gt[inds], assigned=assigned, inds=inds)

    return jax.vmap(one)(proposals, prop_valid, batch["gt_bboxes"], batch["gt_labels"], batch["gt_valid"], keys,
                         inject)


def bbox_loss_by(bbox_forward, bbox_head, train_cfg, feats, sample, batch):
    """Box-branch losses of one (stage's) head on its sampled rows: ``bbox_forward(feats, rois)`` ->
    (roi_feats, cls, reg), then ``bbox_head.loss_and_target``. Returns (logs, stage arrays)."""
    rois = bbox2roi(sample["rois"])
    roi_feats, cls, reg = bbox_forward(feats, rois)
    logs, targets = bbox_head.loss_and_target(cls, reg, rois, sample, batch["gt_bboxes"], train_cfg)
    return logs, dict(rcnn_rois=rois, rcnn_roi_feats=roi_feats, rcnn_cls_score=cls, rcnn_bbox_pred=reg,
                      rcnn_target_bbox_targets=targets)


def mask_loss_by(extractor, mask_head, train_cfg, feats, sample, batch, rows=None):
    """Mask-branch loss of one (stage's) head on the positive rows: the first Spos sampled rows of each
    image hold its positives (``is_pos``). The RoIAligns (features and GT-mask targets) skip other rows;
    the mask head and its loss run on the first ``rows`` rows per image (static; None: all Spos; see
    :mod:`flaxdet.fast_paths.mask_rows`). Returns (loss, stage arrays padded back to Spos rows per image,
    ``need``: the rows this step's positives take -- with ``need > rows`` the positives past ``rows``
    were left out and the caller must re-run with more rows)."""
    spos = sampler_spos(train_cfg)
    k = spos if rows is None else min(int(rows), spos)
    n = sample["valid"].shape[0]
    boxes, pos_valid = sample["rois"][:, :spos], sample["is_pos"][:, :spos]
    need = jnp.max(jnp.where(pos_valid, jnp.arange(1, spos + 1), 0))  # rows per image holding every positive
    boxes_k = boxes[:, :k]  # only the first k rows per image from here on: the rest would be zeros
    pv = pos_valid[:, :k].reshape(-1)
    roi_feats = extractor(feats, bbox2roi(boxes_k), valid=pv)  # (N*k, 14, 14, C), zeros off positives
    loss, targets, logits = mask_head.loss_and_target(mask_head(roi_feats), boxes_k, sample["gt_idx"][:, :k],
                                                      sample["labels"][:, :k], pv, batch["gt_masks"], train_cfg)
    stages = dict(mask_rois=bbox2roi(boxes), mask_roi_feats=roi_feats, mask_preds_sel=logits, mask_targets=targets,
                  mask_valid=pv)
    stages = {k: v if k == "mask_rois" else pad_rows(v, n, spos, flat=True) for k, v in stages.items()}
    return loss, stages, need


class StandardRoIHead(nnx.Module):
    def __init__(self, cfg: StandardRoIHeadCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.shared_head is not None:
            raise ValueError("StandardRoIHead: shared_head is not supported")
        self.bbox_roi_extractor = SingleRoIExtractor(cfg.bbox_roi_extractor)
        self.bbox_head = BBOX_HEADS[cfg.bbox_head.TYPE](cfg.bbox_head, rngs=rngs)
        self.with_mask = cfg.mask_head is not None
        if self.with_mask:
            self.mask_roi_extractor = SingleRoIExtractor(cfg.mask_roi_extractor)
            self.mask_head = FCNMaskHead(cfg.mask_head, rngs=rngs)

    def bbox_forward(self, feats, rois):
        roi_feats = self.bbox_roi_extractor(feats, rois)
        cls, reg = self.bbox_head(roi_feats)
        return roi_feats, cls, reg

    def mask_forward(self, feats, rois):
        roi_feats = self.mask_roi_extractor(feats, rois)
        return roi_feats, self.mask_head(roi_feats)

    def loss(self, feats, proposals, proposal_valid, batch, key, inject=None, mask_rows=None):
        """visdet ``StandardRoIHead.loss``: returns (logs ``loss_cls`` / ``acc`` / ``loss_bbox`` [/ ``loss_mask``],
        stage arrays, the sampled rows, the mask rows per image the positives needed (0 without masks)).
        ``inject``: per-image sampler indices; ``mask_rows``: see :func:`mask_loss_by`."""
        cfg = self.cfg.train_cfg
        s = assign_and_sample(cfg, self.bbox_head.num_classes, proposals, proposal_valid, batch, key, inject)
        logs, stages = self.bbox_loss(feats, s, batch)
        need = jnp.zeros((), jnp.int32)
        if self.with_mask:
            logs["loss_mask"], ms, need = self.mask_loss(feats, s, batch, mask_rows)
            stages.update(ms)
        return logs, stages, s, need

    def bbox_loss(self, feats, sample, batch):
        return bbox_loss_by(self.bbox_forward, self.bbox_head, self.cfg.train_cfg, feats, sample, batch)

    def mask_loss(self, feats, sample, batch, rows=None):
        return mask_loss_by(self.mask_roi_extractor, self.mask_head, self.cfg.train_cfg, feats, sample, batch, rows)

    def mask_row_buckets(self):
        """The training mask branch's static row counts per image, or None without masks."""
        return mask_buckets(sampler_spos(self.cfg.train_cfg)) if self.with_mask else None

    def predict_bbox(self, feats, proposals, proposal_valid, img_shapes, scale_factors, rescale):
        """Returns (dets dict with (N, D, ...) arrays, stage dict)."""
        n, p, _ = proposals.shape
        roi_feats, cls, reg = self.bbox_forward(feats, bbox2roi(proposals))
        bbox_rescale = rescale and not self.with_mask
        fn = lambda r, v, c, b, s, f: self.bbox_head.predict_single(  # noqa: E731
            r, v, c, b, s, f, self.cfg.test_cfg, bbox_rescale)
        boxes, scores, labels, valid = jax.vmap(fn)(proposals, proposal_valid, cls.reshape(n, p, -1),
                                                     reg.reshape(n, p, -1), img_shapes, scale_factors)
        dets = dict(bboxes=boxes, scores=scores, labels=labels, valid=valid)
        return dets, {"bbox_roi_extractor": roi_feats, "bbox_head.cls_score": cls, "bbox_head.bbox_pred": reg}

    def predict_mask(self, feats, dets, scale_factors, canvas_hw, rescale=True, rows=None):
        """Masks for the valid detections. visdet runs the mask branch on the detections it has (none
        when there are none); with a static D the cost would be that of D every time. So RoIAlign skips
        the invalid rows (its ``valid`` mask), and the mask head + pasting run on ``rows`` rows per image
        (static: one of ``mask_buckets(D)``, 0 for none; :class:`flaxdet.inference.Detector` picks it
        from the valid count it reads between two jits) or, with ``rows=None`` (one jit, e.g. the
        parity stages), as :func:`flaxdet.fast_paths.mask_rows.run_mask_rows` decides. Rows past it are
        zeros/False."""
        n, d, _ = dets["bboxes"].shape
        thr = self.cfg.test_cfg.mask_thr_binary
        roi_feats = self.mask_roi_extractor(feats, bbox2roi(dets["bboxes"]), valid=dets["valid"].reshape(-1))
        per_image = roi_feats.reshape(n, d, *roi_feats.shape[1:])

        def run(k):
            logits = run_mask_head(self.mask_head, per_image[:, :k].reshape(n * k, *roi_feats.shape[1:]))
            fn = lambda lg, b, lab, sf: self.mask_head.predict_single(lg, b, lab, sf, canvas_hw, thr, rescale)  # noqa
            masks, boxes = jax.vmap(fn)(logits.reshape(n, k, *logits.shape[1:]), dets["bboxes"][:, :k],
                                        dets["labels"][:, :k], scale_factors)
            return pad_rows(masks, n, d), pad_rows(boxes, n, d), pad_rows(logits, n, d, flat=True)

        masks, boxes, logits = run_mask_rows(run, d, dets["valid"], rows)
        masks = masks & dets["valid"][:, :, None, None]
        out = dict(dets, bboxes=jnp.where(dets["valid"][..., None], boxes, 0), masks=masks)
        return out, {"mask_roi_extractor": roi_feats, "mask_head.mask_preds": logits}
