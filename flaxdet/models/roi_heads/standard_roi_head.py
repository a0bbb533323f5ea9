"""StandardRoIHead (visdet ``roi_heads/standard_roi_head.py``), static-shape predict path."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.config import StandardRoIHeadCfg
from flaxdet.models.roi_heads.bbox_heads.convfc_bbox_head import (ConvFCBBoxHead, Shared2FCBBoxHead,
                                                                 Shared4Conv1FCBBoxHead)
from flaxdet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from flaxdet.models.roi_heads.roi_extractors.single_level_roi_extractor import SingleRoIExtractor

BBOX_HEADS = {"ConvFCBBoxHead": ConvFCBBoxHead, "Shared2FCBBoxHead": Shared2FCBBoxHead,
              "Shared4Conv1FCBBoxHead": Shared4Conv1FCBBoxHead}


def bbox2roi(bboxes):
    """(N, P, 4) -> (N*P, 5) rows [batch_idx, x1, y1, x2, y2] (visdet ``bbox2roi`` on padded lists)."""
    n, p, _ = bboxes.shape
    idx = jnp.repeat(jnp.arange(n, dtype=bboxes.dtype), p)[:, None]
    return jnp.concatenate([idx, bboxes.reshape(n * p, 4)], axis=1)


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
        parity stages), in a ``lax.switch`` over those buckets picking the smallest that holds the
        batch's largest valid count (detections are valid-first). Rows past it are zeros/False."""
        n, d, _ = dets["bboxes"].shape
        thr = self.cfg.test_cfg.mask_thr_binary
        roi_feats = self.mask_roi_extractor(feats, bbox2roi(dets["bboxes"]), valid=dets["valid"].reshape(-1))
        per_image = roi_feats.reshape(n, d, *roi_feats.shape[1:])

        def run(k):
            logits = self.mask_head(per_image[:, :k].reshape(n * k, *roi_feats.shape[1:]))
            fn = lambda lg, b, lab, sf: self.mask_head.predict_single(lg, b, lab, sf, canvas_hw, thr, rescale)  # noqa
            masks, boxes = jax.vmap(fn)(logits.reshape(n, k, *logits.shape[1:]), dets["bboxes"][:, :k],
                                        dets["labels"][:, :k], scale_factors)

            def pad(a, per_image=True):
                a = a if per_image else a.reshape(n, k, *a.shape[1:])
                a = jnp.pad(a, [(0, 0), (0, d - k)] + [(0, 0)] * (a.ndim - 2))
                return a if per_image else a.reshape(n * d, *a.shape[2:])

            return pad(masks), pad(boxes), pad(logits, False)

        masks, boxes, logits = run_mask_rows(run, d, dets["valid"], rows)
        masks = masks & dets["valid"][:, :, None, None]
        out = dict(dets, bboxes=jnp.where(dets["valid"][..., None], boxes, 0), masks=masks)
        return out, {"mask_roi_extractor": roi_feats, "mask_head.mask_preds": logits}


def run_mask_rows(run, d, valid, rows=None):
    """``run(k)`` (the mask branch on the first k of D rows per image, padded back to D) on ``rows``
    rows (static; 0: zeros) or, with ``rows=None``, by ``lax.switch`` on the smallest of
    ``mask_buckets(D)`` holding the largest count of ``valid`` (N, D) per image (zeros when none).
    XLA:CPU runs conditional branches slower (measured 1.0 s static vs 1.1 s in the switch for 100
    detections at 800x1333), hence the static form where the caller can read the count."""
    sizes = mask_buckets(d)
    shapes = jax.eval_shape(lambda: run(sizes[0]))
    none = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)  # noqa: E731
    if rows is not None:
        return run(int(rows)) if rows > 0 else none()
    count = valid.sum(1).max()
    branch = jnp.where(count > 0, 1 + jnp.searchsorted(jnp.asarray(sizes), count), 0)
    return jax.lax.switch(branch, [none] + [partial(run, k) for k in sizes])


def mask_rows_for_count(d, count):
    """The static ``rows`` of :func:`run_mask_rows` for ``count`` valid detections (of D) per image."""
    return 0 if count <= 0 else next(k for k in mask_buckets(d) if k >= count)


def mask_buckets(d):
    """Static row counts the mask branch is compiled for: D/8, D/4, D/2, D (rounded up, distinct)."""
    return tuple(sorted({max(1, -(-d // f)) for f in (8, 4, 2, 1)})) if d > 0 else (0,)
