"""Stage-by-stage comparison of two runs of the same model on the same image.

Both sides are reduced to one "stage dict" in visdet's conventions (numpy, NCHW, image 0 of the
batch, padding removed): ``preprocessed``, ``backbone.i``, ``neck.i``, ``rpn_head.cls_score.l`` /
``bbox_pred.l``, ``proposals.{bboxes,scores}``, ``bbox_roi_extractor``, ``bbox_head.{cls_score,bbox_pred}``,
``mask_roi_extractor``, ``mask_head.mask_preds``, ``det.{bboxes,scores,labels,masks}`` -- the keys of the
visdet goldens (whose ``*.first128``/``*.first32`` arrays hold the leading rows). One-stage (RTMDet) models have
no proposals or RoI stages; their dense head outputs are ``cls_scores.l``, ``bbox_preds.l``, ``kernel_preds.l``,
``mask_feats`` and RTMDet-Ins adds ``det.mask_logits_first16`` (the first 16 detections' mask logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flaxdet.parity import MASK_PIXELS_PER_IMAGE, TOLERANCES, Row, compare_array, compare_detections, tolerance_for

RTMDET_HEAD_PREFIXES = ("cls_scores.", "bbox_preds.", "kernel_preds.", "mask_feats")
DENSE_PREFIXES = ("preprocessed", "backbone.", "neck.", "rpn_head.", *RTMDET_HEAD_PREFIXES)
# Cascade R-CNN stages after the first: one row per proposal / per detection, like the stage-0 keys
CASCADE_PROPOSAL_ROWS = ("cascade.rois.", "cascade.bbox_roi_extractor.", "cascade.bbox_head.", "cascade.cls_score")
CASCADE_DET_ROWS = ("cascade.mask_head.", "cascade.mask_probs")


def flaxdet_stages(stages: dict, dets_unpadded: dict | None = None) -> dict:
    """flaxdet ``predict(..., with_stages=True)`` output (device arrays, NHWC, padded) -> stage dict."""
    out = {}
    pv = np.asarray(stages["proposals.valid"][0]) if "proposals.valid" in stages else None
    n_prop = int(pv.sum()) if pv is not None else None
    for k, v in stages.items():
        a = np.asarray(v)
        if k.startswith(DENSE_PREFIXES):
            out[k] = a[:1].transpose(0, 3, 1, 2) if a.ndim == 4 else a[:1]
        elif k in ("proposals.bboxes", "proposals.scores"):
            out[k] = a[0][pv]
        elif k in ("bbox_roi_extractor", "bbox_head.cls_score", "bbox_head.bbox_pred") or \
                k.startswith(CASCADE_PROPOSAL_ROWS):
            p = stages["proposals.valid"].shape[1] if pv is not None else a.shape[0]
            a = a[:p][pv] if pv is not None else a
            out[k] = a.transpose(0, 3, 1, 2) if a.ndim == 4 else a
        elif k == "det.mask_logits":  # RTMDet-Ins: (N, D, h, w), rows as the detections; reference/ keeps 16
            out["det.mask_logits_first16"] = a[0][np.asarray(stages["det.valid"][0])][:16]
        elif k in ("mask_roi_extractor", "mask_head.mask_preds") or k.startswith(CASCADE_DET_ROWS):
            dv = np.asarray(stages["det.valid"][0])
            a = a[: dv.shape[0]][dv]
            out[k] = a.transpose(0, 3, 1, 2)
    if dets_unpadded is not None:
        out.update({f"det.{k}": np.asarray(v) for k, v in dets_unpadded.items()})
    out["_n_proposals"] = n_prop
    return out


def torch_stages(stages: dict) -> dict:
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in stages.items()}


def _first(theirs, key):
    """A golden keeps the first rows of some stages (``bbox_roi_extractor.first128``)."""
    if key in theirs:
        return theirs[key]
    for suffix in (".first128", ".first32"):
        if key + suffix in theirs:
            return theirs[key + suffix]
    return None


def _row_match(ours_boxes, theirs_boxes, atol):
    n = min(len(ours_boxes), len(theirs_boxes))
    m = np.zeros(len(theirs_boxes), bool)
    if n:
        m[:n] = np.abs(np.asarray(ours_boxes[:n]) - np.asarray(theirs_boxes[:n])).max(1) <= atol
    return m


@dataclass(frozen=True)
class RoIGeometry:
    """What decides RoIAlign's sampling for a box, for :func:`sampling_flips`: the FPN level
    (``floor(log2(sqrt(area) / finest_scale + 1e-6))``) and, with the adaptive grid
    (``sampling_ratio == 0``), the per-bin sample counts ``ceil(side / stride / output_size)``."""
    strides: tuple
    finest_scale: float
    output_size: tuple
    sampling_ratio: int

    @classmethod
    def from_extractor_cfg(cls, cfg):
        size = cfg.roi_layer.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(tuple(cfg.featmap_strides), float(cfg.finest_scale), size, int(cfg.roi_layer.sampling_ratio))


def sampling_flips(ours_boxes, theirs_boxes, geom: RoIGeometry | None, scale_factor=None, rel=1e-5):
    """(n,) bool: rows where RoIAlign's sampling is discontinuous between the two boxes -- the FPN
    level or an adaptive sample count differs (or sits within ``rel`` of flipping). Two boxes 1e-3 px
    apart that straddle ``bin == 1.0`` sample a 1x1 vs 2x2 grid: the features legitimately differ, so
    such rows are skipped (and counted) like tie flips. Boxes in the frame RoIAlign saw: ``scale_factor``
    (w, h, w, h) maps detections back from the original image."""
    n = min(len(ours_boxes), len(theirs_boxes))
    out = np.zeros(len(theirs_boxes), bool)
    if geom is None or n == 0:
        return out
    sf = np.ones(4) if scale_factor is None else np.resize(np.asarray(scale_factor, np.float64), 4)
    a, b = (np.asarray(x[:n], np.float64) * sf for x in (ours_boxes, theirs_boxes))

    def straddles(u, v, first):  # differ, and an integer >= first lies in [min - tol, max + tol]
        lo, hi = np.minimum(u, v), np.maximum(u, v)
        tol = rel * np.maximum(np.abs(hi), 1)
        return (u != v) & (np.maximum(np.ceil(lo - tol), first) <= hi + tol)

    def level_arg(x):
        return np.log2(np.sqrt(np.maximum((x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1]), 0)) / geom.finest_scale + 1e-6)

    la, lb = level_arg(a), level_arg(b)
    nl = len(geom.strides)
    lvl = np.clip(np.floor(lb), 0, nl - 1).astype(int)
    flip = straddles(la, lb, 1) & (np.minimum(la, lb) < nl - 1)  # boundaries between levels 0 .. nl-1
    if geom.sampling_ratio <= 0:
        stride = np.asarray(geom.strides, np.float64)[lvl]
        for axis, (lo, hi) in enumerate(((1, 3), (0, 2))):
            n_out = geom.output_size[axis]
            flip |= straddles((a[:, hi] - a[:, lo]) / stride / n_out, (b[:, hi] - b[:, lo]) / stride / n_out, 1)
    out[:n] = flip
    return out


def compare_stages(ours: dict, theirs: dict, teacher_forced: bool = False, bbox_geometry: RoIGeometry | None = None,
                   mask_geometry: RoIGeometry | None = None, scale_factor=None) -> list[Row]:
    """All comparable stages. End to end (default) the RoI stages are compared on the rows whose
    input boxes agree (a tie flip upstream changes which box sits in a row) and, given the
    extractors' geometry, whose RoIAlign sampling agrees (:func:`sampling_flips`; ``scale_factor``
    maps detections to the resized frame the mask RoIs were sampled in)."""
    rows = []
    for k in sorted((k for k in theirs if k.startswith(DENSE_PREFIXES)), key=_stage_order):
        if k in ours:
            tol = None  # the table's row for the stage's prefix
            if k.startswith(RTMDET_HEAD_PREFIXES):
                tol = TOLERANCES["rtmdet_head" if teacher_forced else "e2e.rtmdet_head"]
            rows.append(compare_array(k, ours[k], theirs[k], tol))
    box_px = TOLERANCES["e2e.det.bboxes_px"].rtol
    score_tol = TOLERANCES["e2e.det.scores"].rtol
    if "proposals.bboxes" in theirs and "proposals.bboxes" in ours:
        rows += compare_detections("proposals", {k: ours[f"proposals.{k}"] for k in ("bboxes", "scores")},
                                   {k: theirs[f"proposals.{k}"] for k in ("bboxes", "scores")},
                                   box_atol=box_px, score_atol=score_tol)
        same = _row_match(ours["proposals.bboxes"], theirs["proposals.bboxes"], box_px)
        grid = same & ~sampling_flips(ours["proposals.bboxes"], theirs["proposals.bboxes"], bbox_geometry)
    else:
        same = grid = None
    for k in ("bbox_roi_extractor", "bbox_head.cls_score", "bbox_head.bbox_pred"):
        t = _first(theirs, k)
        if t is None or k not in ours:
            continue
        o = ours[k][: len(t)]
        m = same[: len(t)] if same is not None and len(o) == len(t) else np.ones(len(t), bool)
        g = grid[: len(t)] if grid is not None and len(o) == len(t) else m
        if len(o) != len(t):
            rows.append(Row(k, t.shape, float("inf"), float("inf"), 0, False, f"{len(o)} rows vs {len(t)}"))
            continue
        tol = tolerance_for(k) if teacher_forced else TOLERANCES["e2e.features"]
        rows.append(_with_note(compare_array(k, o[g], t[g], tol), m, g))
    rows += _cascade_rows(ours, theirs, grid, teacher_forced, bbox_geometry)
    if "det.bboxes" in theirs and "det.bboxes" in ours:
        det_keys = [k for k in ("bboxes", "scores", "labels", "masks") if f"det.{k}" in theirs and f"det.{k}" in ours]
        rows += compare_detections("det", {k: ours[f"det.{k}"] for k in det_keys},
                                   {k: theirs[f"det.{k}"] for k in det_keys}, box_atol=box_px,
                                   score_atol=score_tol, mask_pixels=MASK_PIXELS_PER_IMAGE)
        dsame = _row_match(ours["det.bboxes"], theirs["det.bboxes"], box_px)
        dgrid = dsame & ~sampling_flips(ours["det.bboxes"], theirs["det.bboxes"], mask_geometry, scale_factor)
        cascade_masks = sorted(k for k in theirs if k.startswith(CASCADE_DET_ROWS))
        for k in ("mask_roi_extractor", "mask_head.mask_preds", *cascade_masks):
            t = _first(theirs, k)
            if t is None or k not in ours:
                continue
            o = ours[k][: len(t)]
            if len(o) != len(t):
                rows.append(Row(k, t.shape, float("inf"), float("inf"), 0, False, f"{len(o)} rows vs {len(t)}"))
                continue
            m, g = dsame[: len(t)], dgrid[: len(t)]
            tol = tolerance_for(k) if teacher_forced else TOLERANCES["e2e.features"]
            rows.append(_with_note(compare_array(k, o[g], t[g], tol), m, g))
        if "det.mask_logits_first16" in theirs and "det.mask_logits_first16" in ours:
            k, t, o = "det.mask_logits_first16", theirs["det.mask_logits_first16"], ours["det.mask_logits_first16"]
            tol = TOLERANCES["rtmdet.mask_logits" if teacher_forced else "e2e.rtmdet_head"]
            if len(o) != len(t):
                rows.append(Row(k, t.shape, float("inf"), float("inf"), tol.rtol, False, f"{len(o)} rows vs {len(t)}"))
            else:  # RTMDet-Ins: the dynamic convs of the detections both sides kept in the same row
                m = dsame[: len(t)]
                rows.append(_with_note(compare_array(k, o[m], t[m], tol), m))
    return rows


def _cascade_rows(ours, theirs, ok, teacher_forced, geom):
    """Cascade R-CNN's later stages: the RoIs each stage ran on (refined by the previous stage) and its
    features/head outputs, on the rows still comparable -- same proposal, and the same RoIAlign level/grid
    in every stage so far (a flip upstream legitimately moves everything after it). End to end the RoIs
    are judged in pixels (``e2e.det.bboxes_px``), the rest with ``e2e.features``."""
    rows = []
    box_px = TOLERANCES["e2e.det.bboxes_px"].rtol
    stages = sorted({int(k.split(".")[2]) for k in theirs if k.startswith("cascade.rois.")})
    keep = None if ok is None else np.asarray(ok, bool)
    for s in stages:
        t, o = theirs[f"cascade.rois.{s}"], ours.get(f"cascade.rois.{s}")
        if o is None:
            continue
        if len(o) != len(t):
            rows.append(Row(f"cascade.rois.{s}", t.shape, float("inf"), float("inf"), 0, False,
                            f"{len(o)} rows vs {len(t)}"))
            return rows
        m = np.ones(len(t), bool) if keep is None else keep[: len(t)]
        if teacher_forced:
            row = compare_array(f"cascade.rois.{s}", o[m], t[m])
        else:
            err = np.abs(np.asarray(o, np.float64) - np.asarray(t, np.float64)).max(1) if len(t) else np.zeros(0)
            worst = float(err[m].max()) if m.any() else 0.0
            row = Row(f"cascade.rois.{s}", t.shape, worst, 0.0, box_px, worst <= box_px, "pixels")
        rows.append(_with_note(row, m, m))
        g = m & ~sampling_flips(o, t, geom)
        for k in (f"cascade.bbox_roi_extractor.{s}", f"cascade.bbox_head.{s}.cls_score",
                  f"cascade.bbox_head.{s}.bbox_pred"):
            if k in theirs and k in ours:
                tol = tolerance_for(k) if teacher_forced else TOLERANCES["e2e.features"]
                rows.append(_with_note(compare_array(k, ours[k][g], theirs[k][g], tol), m, g))
        keep = g
    if "cascade.cls_score" in theirs and "cascade.cls_score" in ours:
        t = theirs["cascade.cls_score"]
        g = np.ones(len(t), bool) if keep is None else keep[: len(t)]
        tol = tolerance_for("cascade.cls_score") if teacher_forced else TOLERANCES["e2e.features"]
        rows.append(_with_note(compare_array("cascade.cls_score", ours["cascade.cls_score"][g], t[g], tol), g))
    return rows


def _with_note(row: Row, mask, grid=None) -> Row:
    notes = [row.note] if row.note else []
    if not mask.all():
        notes.append(f"{int((~mask).sum())} row(s) skipped: input box tie-flipped")
    flips = int((mask & ~grid).sum()) if grid is not None else 0
    if flips:
        notes.append(f"{flips} row(s) skipped: RoIAlign level/sample grid flipped")
    row.note = "; ".join(notes)
    row.extra["sampling_flips"] = flips
    return row


def geometry_of(model_cfg):
    """(bbox, mask) :class:`RoIGeometry` of a two-stage config (mask None without a mask branch); (None, None)
    for a one-stage (RTMDet) config, which has no RoIAlign."""
    rh = getattr(model_cfg, "roi_head", None)
    if rh is None:
        return None, None
    first = lambda c: c[0] if isinstance(c, tuple) else c  # noqa: E731  (Cascade: per-stage tuples)
    mask_ext = rh.mask_roi_extractor if rh.mask_roi_extractor is not None else rh.bbox_roi_extractor
    mask = RoIGeometry.from_extractor_cfg(first(mask_ext)) if rh.mask_head is not None else None
    return RoIGeometry.from_extractor_cfg(first(rh.bbox_roi_extractor)), mask


def _stage_order(k):
    order = {"preprocessed": 0, "backbone": 1, "neck": 2, "rpn_head": 3, "mask_feats": 3, "cls_scores": 4,
             "bbox_preds": 5, "kernel_preds": 6}
    parts = k.split(".")
    return (order.get(parts[0], 9), parts[1] if len(parts) > 2 else "", int(parts[-1]) if parts[-1].isdigit() else 0)
