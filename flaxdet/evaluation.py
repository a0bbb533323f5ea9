"""COCO bbox/segm evaluation (pycocotools) of flaxdet -- or of reference/ on the same weights.

Images go through visdet's test pipeline (OpenCV decode, keep-ratio resize to ``scale``); detections
are rescaled to the original image, masks pasted at the original size, category ids mapped back to
the annotation file's ids. Returns the standard 12 COCO numbers per task (``bbox_mAP``,
``bbox_mAP_50`` ...) and writes the results JSON.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from flaxdet.config import final_bbox_head, is_two_stage, test_scale
from flaxdet.data.coco import CocoDataset, DatasetError
from flaxdet.data.grain_pipeline import eval_inputs
from flaxdet.inference import Detector

STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_1", "AR_10", "AR_100", "AR_s", "AR_m",
              "AR_l")
_AREAS = {"s": "small (area < 32x32 px) ", "m": "medium (32x32 to 96x96 px) ", "l": "large (area > 96x96 px) "}


def undefined_reason(name: str) -> str:
    """Why pycocotools gives -1 for a statistic: no ground truth it could be computed on."""
    area = _AREAS.get(name.rsplit("_", 1)[-1], "") if name.endswith(("_s", "_m", "_l")) else ""
    return f"undefined: no {area}ground-truth objects (not crowd) in the evaluated images"


def _empty_results(gt):
    """A COCO results object with no detections (pycocotools' loadRes refuses an empty list)."""
    dt = COCO()
    dt.dataset = dict(images=list(gt.dataset.get("images", [])), categories=list(gt.dataset.get("categories", [])),
                      annotations=[])
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def _predict_fn(model, backend, classes, bucket="exact", dtype=None):
    if dtype not in (None, "float32") and backend != "flaxdet":
        raise ValueError(f"compute dtype {dtype} is a flaxdet option: the reference backend runs float32")
    if backend == "flaxdet":
        det = Detector(model, classes, dtype=dtype)
        return lambda img, meta: det.detect([img], [meta], bucket=bucket)[0]
    if backend == "reference":
        import torch

        def run(img, meta):
            r = model.predict([torch.from_numpy(img).permute(2, 0, 1).contiguous()], [meta])[0]
            return {k: v.numpy() for k, v in r.items()}

        return run
    raise ValueError(f"backend must be flaxdet or reference, got {backend!r}")


def num_classes_of(cfg) -> int:
    """The class count a detector predicts: the (last) RoI bbox head's for two-stage models, the dense head's
    (``bbox_head.num_classes``) for one-stage (RTMDet) models."""
    return final_bbox_head(cfg.roi_head).num_classes if is_two_stage(cfg) else cfg.bbox_head.num_classes


def detections_to_coco(det, image_id, cat_ids):
    out = []
    for i in range(len(det["scores"])):
        x1, y1, x2, y2 = (float(v) for v in det["bboxes"][i])
        r = dict(image_id=int(image_id), category_id=int(cat_ids[int(det["labels"][i])]),
                 bbox=[x1, y1, x2 - x1, y2 - y1], score=float(det["scores"][i]))
        if "masks" in det:
            rle = mask_utils.encode(np.asfortranarray(det["masks"][i].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
        out.append(r)
    return out


def evaluate(model, ann_file, img_dir=None, scale=None, backend="flaxdet", out_json=None, progress=True,
             max_images=None, bucket="exact", dtype=None):
    """``scale``: the test resize (default: the model's, :func:`flaxdet.config.test_scale`); ``dtype``: the flaxdet
    backend's compute dtype (:class:`flaxdet.inference.Detector`; "bfloat16" sets it on ``model``). A statistic
    pycocotools cannot compute (its -1: no ground truth of that kind in the evaluated images) is None, with the
    reason in ``metrics["undefined"]`` -- never a 0.0 that reads like a result."""
    scale = scale or test_scale(model.cfg)
    ds = CocoDataset(ann_file, img_dir)

    n_model = num_classes_of(model.cfg)
    if n_model != len(ds.classes):
        raise DatasetError(f"the model predicts {n_model} classes but {ann_file} has {len(ds.classes)} "
                           f"categories ({ds.classes}); evaluate a model fine-tuned on this label set")
    predict = _predict_fn(model, backend, ds.classes, bucket, dtype)
    results, ids = [], []
    recs = ds.records[:max_images] if max_images else ds.records
    inputs = eval_inputs(recs, scale)  # decode + test resize, prefetched by grain while the model runs
    for rec, img, meta in tqdm(inputs, total=len(recs), desc=f"eval ({backend})", unit="img", disable=not progress,
                               file=sys.stderr):
        results += detections_to_coco(predict(img, meta), rec.image_id, ds.cat_ids)
        ids.append(rec.image_id)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    metrics, undefined = {}, {}
    tasks = ["bbox"] + (["segm"] if results and "segmentation" in results[0] else [])
    for task in tasks:
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(json.loads(json.dumps(results))) if results else _empty_results(gt)
            ev = COCOeval(gt, dt, task)
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for n, v in zip(STAT_NAMES, ev.stats):
            key = f"{task}_{n}"
            metrics[key] = float(v) if v > -1 else None
            if v <= -1:
                undefined[key] = undefined_reason(n)
    metrics["undefined"] = undefined
    metrics["num_images"] = len(ids)
    metrics["num_detections"] = len(results)
    return metrics
