"""Stage-by-stage comparison of two runs of the same model on the same image.

Both sides are reduced to one "stage dict" in visdet's conventions (numpy, NCHW, image 0 of the
batch, padding removed): ``preprocessed``, ``backbone.i``, ``neck.i``, ``rpn_head.cls_score.l`` /
``bbox_pred.l``, ``proposals.{bboxes,scores}``, ``bbox_roi_extractor``, ``bbox_head.{cls_score,bbox_pred}``,
``mask_roi_extractor``, ``mask_head.mask_preds``, ``det.{bboxes,scores,labels,masks}`` -- the keys of the
visdet goldens (whose ``*.first128``/``*.first32`` arrays hold the leading rows).
"""
from __future__ import annotations

import numpy as np

from flaxdet.parity import (MASK_PIXELS_PER_IMAGE, TOLERANCES, Row, compare_array, compare_detections,
                            tolerance_for)

DENSE_PREFIXES = ("preprocessed", "backbone.", "neck.", "rpn_head.")


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
        elif k in ("bbox_roi_extractor", "bbox_head.cls_score", "bbox_head.bbox_pred"):
            p = stages["proposals.valid"].shape[1] if pv is not None else a.shape[0]
            a = a[:p][pv] if pv is not None else a
            out[k] = a.transpose(0, 3, 1, 2) if a.ndim == 4 else a
        elif k in ("mask_roi_extractor", "mask_head.mask_preds"):
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


def compare_stages(ours: dict, theirs: dict, teacher_forced: bool = False) -> list[Row]:
    """All comparable stages. End to end (default) the RoI stages are compared on the rows whose
    input boxes agree (a tie flip upstream changes which box sits in a row)."""
    rows = []
    for k in sorted((k for k in theirs if k.startswith(DENSE_PREFIXES)), key=_stage_order):
        if k in ours:
            rows.append(compare_array(k, ours[k], theirs[k]))
    box_px = TOLERANCES["e2e.det.bboxes_px"].rtol
    score_tol = TOLERANCES["e2e.det.scores"].rtol
    if "proposals.bboxes" in theirs and "proposals.bboxes" in ours:
        rows += compare_detections("proposals", {k: ours[f"proposals.{k}"] for k in ("bboxes", "scores")},
                                   {k: theirs[f"proposals.{k}"] for k in ("bboxes", "scores")},
                                   box_atol=box_px, score_atol=score_tol)
        same = _row_match(ours["proposals.bboxes"], theirs["proposals.bboxes"], box_px)
    else:
        same = None
    for k in ("bbox_roi_extractor", "bbox_head.cls_score", "bbox_head.bbox_pred"):
        t = _first(theirs, k)
        if t is None or k not in ours:
            continue
        o = ours[k][: len(t)]
        m = same[: len(t)] if same is not None and len(o) == len(t) else np.ones(len(t), bool)
        if len(o) != len(t):
            rows.append(Row(k, t.shape, float("inf"), float("inf"), 0, False, f"{len(o)} rows vs {len(t)}"))
            continue
        tol = tolerance_for(k) if teacher_forced else TOLERANCES["e2e.features"]
        rows.append(_with_note(compare_array(k, o[m], t[m], tol), m))
    if "det.bboxes" in theirs and "det.bboxes" in ours:
        det_keys = [k for k in ("bboxes", "scores", "labels", "masks") if f"det.{k}" in theirs and f"det.{k}" in ours]
        rows += compare_detections("det", {k: ours[f"det.{k}"] for k in det_keys},
                                   {k: theirs[f"det.{k}"] for k in det_keys}, box_atol=box_px,
                                   score_atol=score_tol, mask_pixels=MASK_PIXELS_PER_IMAGE)
        dsame = _row_match(ours["det.bboxes"], theirs["det.bboxes"], box_px)
        for k in ("mask_roi_extractor", "mask_head.mask_preds"):
            t = _first(theirs, k)
            if t is None or k not in ours:
                continue
            o = ours[k][: len(t)]
            if len(o) != len(t):
                rows.append(Row(k, t.shape, float("inf"), float("inf"), 0, False, f"{len(o)} rows vs {len(t)}"))
                continue
            m = dsame[: len(t)]
            tol = tolerance_for(k) if teacher_forced else TOLERANCES["e2e.features"]
            rows.append(_with_note(compare_array(k, o[m], t[m], tol), m))
    return rows


def _with_note(row: Row, mask) -> Row:
    if not mask.all():
        row.note = (row.note + "; " if row.note else "") + f"{int((~mask).sum())} row(s) skipped: input box tie-flipped"
    return row


def _stage_order(k):
    order = {"preprocessed": 0, "backbone": 1, "neck": 2, "rpn_head": 3}
    parts = k.split(".")
    return (order.get(parts[0], 9), parts[1] if len(parts) > 2 else "", int(parts[-1]) if parts[-1].isdigit() else 0)
