"""BaseDenseHead's test path (visdet ``models/dense_heads/base_dense_head.py``) as the RTMDet heads use it,
with ``filter_scores_and_topk`` (visdet ``models/utils/misc.py``).

Per image: per level, sigmoid scores of every (prior, class) pair above ``score_thr``, sorted descending, the
first ``nms_pre`` kept; the candidates of all levels are decoded (DistancePointBBoxCoder, clipped to
``img_shape``), rescaled to the original image, filtered by ``min_bbox_size`` (strictly larger w and h),
class-wise NMS (``layers/bbox_nms.batched_nms``: visdet's float32 class-offset trick below ``split_thr``, one
NMS per class above), first ``max_per_img`` kept.

Deviations from visdet, both on purpose: rescale divides by the 2-value (w, h) ``scale_factor`` (visdet's
Resize stores 4 values and its ``scale_boxes`` then raises; (w, h, w, h) is accepted and its first two
used), and NMS at >= ``split_thr`` candidates uses the configured IoU for every class (visdet: 0.5 after the
first class). Results are dicts of tensors; ``stages`` (a dict, first image only) receives every step under
the goldens' names (``topk.{l}.*``, ``cand.*``, ``rescale.*``, ``min_size.keep``, ``nms_in.*``, ``nms.*``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flaxdet_reference.models.layers.bbox_nms import batched_nms


def filter_scores_and_topk(scores, score_thr, topk, results=None):
    """scores (N, K) -> (scores, labels, keep_idxs (row index), {k: v[keep_idxs]}) of the at most ``topk``
    (row, class) pairs above ``score_thr``, by descending score."""
    valid_mask = scores > score_thr
    scores = scores[valid_mask]
    valid_idxs = torch.nonzero(valid_mask)
    num_topk = min(topk, valid_idxs.size(0))
    scores, idxs = scores.sort(descending=True)
    keep_idxs, labels = valid_idxs[idxs[:num_topk]].unbind(dim=1)
    filtered = None if results is None else {k: v[keep_idxs] for k, v in results.items()}
    return scores[:num_topk], labels, keep_idxs, filtered


def take(results: dict, idx) -> dict:
    """Index every per-instance field (InstanceData's ``results[idx]``)."""
    return {k: v[idx] for k, v in results.items()}


def scale_factor_wh(img_meta) -> tuple[float, float]:
    """(w, h) from a 2-value (w, h) or visdet's 4-value (w, h, w, h) ``scale_factor``."""
    sf = img_meta.get("scale_factor")
    if sf is None:
        raise ValueError("rescale=True needs img_meta['scale_factor'] (w, h)")
    sf = tuple(float(s) for s in np.asarray(sf, dtype=np.float64).reshape(-1))
    if len(sf) not in (2, 4):
        raise ValueError(f"scale_factor must be (w, h) or (w, h, w, h), got {sf}")
    return sf[0], sf[1]


class BaseDenseHead(nn.Module):
    """Test-path mixin; subclasses set ``prior_generator``, ``bbox_coder``, ``cls_out_channels``,
    ``use_sigmoid_cls``, ``test_cfg`` and ``priors_with_stride`` (whether results carry (x, y, sw, sh) priors)."""
    priors_with_stride = False

    def predict(self, x, img_metas, rescale=False, stages=None):
        outs = self(x)
        if stages is not None:
            self.record_outputs(outs, stages)
        return self.predict_by_feat(*outs, img_metas=img_metas, rescale=rescale, stages=stages)

    @staticmethod
    def record_outputs(outs, stages):
        for name, per_level in zip(("cls_scores", "bbox_preds"), outs):
            stages.update({f"{name}.{lvl}": t for lvl, t in enumerate(per_level)})

    def predict_by_feat(self, cls_scores, bbox_preds, img_metas, cfg=None, rescale=False, with_nms=True,
                        stages=None, extra=None, image_feats=None):
        """``extra``: {name: per-level (N, C, H, W) tensors} filtered with the candidates (the Ins kernels);
        ``image_feats``: {name: (N, ...) tensors} handed per image to ``_bbox_post_process`` (the Ins mask_feat)."""
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = self.prior_generator.grid_priors(sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device,
                                                  with_stride=self.priors_with_stride)
        extra, image_feats = extra or {}, image_feats or {}
        return [self._predict_by_feat_single(
            [c[i].detach() for c in cls_scores], [b[i].detach() for b in bbox_preds], priors, meta, cfg, rescale,
            with_nms, stages if i == 0 else None, {k: [t[i].detach() for t in v] for k, v in extra.items()},
            {k: v[i].detach() for k, v in image_feats.items()}) for i, meta in enumerate(img_metas)]

    def _predict_by_feat_single(self, cls_score_list, bbox_pred_list, mlvl_priors, img_meta, cfg=None,
                                rescale=False, with_nms=True, stages=None, extra=None, image_feats=None):
        cfg = self.test_cfg if cfg is None else cfg
        extra = extra or {}
        mlvl = {k: [] for k in ("bbox_pred", "priors", "scores", "labels", "level", *extra)}
        for lvl, (cls_score, bbox_pred, priors) in enumerate(zip(cls_score_list, bbox_pred_list, mlvl_priors)):
            if cls_score.shape[-2:] != bbox_pred.shape[-2:]:
                raise ValueError(f"level {lvl}: cls {tuple(cls_score.shape)} vs reg {tuple(bbox_pred.shape)}")
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, self.bbox_coder.encode_size)
            cls_score = cls_score.permute(1, 2, 0).reshape(-1, self.cls_out_channels)
            scores = cls_score.sigmoid() if self.use_sigmoid_cls else cls_score.softmax(-1)[:, :-1]
            fields = dict(bbox_pred=bbox_pred, priors=priors,
                          **{k: v[lvl].permute(1, 2, 0).reshape(-1, v[lvl].shape[0]) for k, v in extra.items()})
            scores, labels, keep_idxs, fields = filter_scores_and_topk(scores, cfg.score_thr, cfg.nms_pre, fields)
            if stages is not None:
                stages.update({f"topk.{lvl}.scores": scores, f"topk.{lvl}.labels": labels,
                               f"topk.{lvl}.keep_idxs": keep_idxs})
            fields.update(scores=scores, labels=labels, level=torch.full_like(labels, lvl))
            for k, v in fields.items():
                mlvl[k].append(v)
        cat = {k: torch.cat(v) for k, v in mlvl.items()}
        results = dict(bboxes=self.bbox_coder.decode(cat["priors"][:, :2], cat["bbox_pred"],
                                                     max_shape=img_meta["img_shape"]),
                       scores=cat["scores"], labels=cat["labels"], **{k: cat[k] for k in extra})
        if self.priors_with_stride:
            results["priors"] = cat["priors"]
        if stages is not None:
            stages.update({f"cand.{k}": v for k, v in results.items()})
            stages["cand.level"] = cat["level"]
        return self._bbox_post_process(results, cfg, rescale, with_nms, img_meta, stages, image_feats)

    def _bbox_post_process(self, results, cfg, rescale=False, with_nms=True, img_meta=None, stages=None,
                           image_feats=None):
        if rescale:
            factor = [1 / s for s in scale_factor_wh(img_meta)]
            results["bboxes"] = results["bboxes"] * results["bboxes"].new_tensor(factor).repeat((1, 2))
            if stages is not None:
                stages.update({"rescale.bboxes": results["bboxes"], "rescale.factor": np.array(factor)})
        if cfg.min_bbox_size >= 0:
            b = results["bboxes"]
            valid = ((b[:, 2] - b[:, 0]) > cfg.min_bbox_size) & ((b[:, 3] - b[:, 1]) > cfg.min_bbox_size)
            if stages is not None:
                stages["min_size.keep"] = valid
            if not valid.all():
                results = take(results, valid)
        if stages is not None:
            stages.update({f"nms_in.{k}": results[k] for k in ("bboxes", "scores", "labels")})
        if with_nms and results["bboxes"].numel() > 0:
            nms = cfg.nms
            dets, keep = batched_nms(results["bboxes"], results["scores"], results["labels"], nms.iou_threshold,
                                     nms.split_thr, nms.class_agnostic)
            results = take(results, keep)
            results["scores"] = dets[:, -1]
            if stages is not None:
                stages.update({"nms.keep": keep, "nms.scores": dets[:, -1]})
            results = take(results, slice(0, cfg.max_per_img))
        return results
