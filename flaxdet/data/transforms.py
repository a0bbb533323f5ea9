"""visdet's standard test pipeline: OpenCV decode (BGR), keep-ratio resize with visdet's rounding.

visdet ``Resize(scale=(1333, 800), keep_ratio=True)`` (``visdet/cv/transforms/processing.py`` and
``visdet/cv/image/geometric.py``)::

    sf    = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_w = int(w * sf + 0.5);  new_h = int(h * sf + 0.5)
    img   = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    scale_factor = float32 [new_w / w, new_h / h, new_w / w, new_h / h]

Training batches: :func:`pad_ground_truth` packs per-image GTs into padded arrays with a valid mask (the
static-shape form the training forward takes), :func:`own_pad_shape` is an image's own padded extent.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

DEFAULT_TEST_SCALE = (1333, 800)


class ImageError(ValueError):
    """An image file that cannot be read."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file with OpenCV into (H, W, 3) uint8 BGR, as visdet's loader does."""
    p = Path(path)
    if p.is_dir():
        raise ImageError(f"{p} is a directory, not an image file (give the files: {p}/*.jpg)")
    if not p.is_file():
        raise ImageError(f"image not found: {p}")
    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageError(f"cannot decode image {p} (not an image, or a format OpenCV cannot read)")
    return img


def rescale_size(w: int, h: int, scale=DEFAULT_TEST_SCALE) -> tuple[int, int]:
    """visdet ``rescale_size`` + ``_scale_size``: the keep-ratio target (new_w, new_h)."""
    long_edge, short_edge = max(scale), min(scale)
    sf = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * float(sf) + 0.5), int(h * float(sf) + 0.5)


def resize_keep_ratio(img: np.ndarray, scale=DEFAULT_TEST_SCALE) -> tuple[np.ndarray, dict]:
    """Returns (resized BGR image, meta with ori_shape, img_shape, scale_factor [w,h,w,h] float32)."""
    h, w = img.shape[:2]
    new_w, new_h = rescale_size(w, h, scale)
    out = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    sf = np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    return out, dict(ori_shape=(h, w), img_shape=(new_h, new_w), scale_factor=tuple(float(s) for s in sf))


def prepare_test_image(path: str | Path, scale=DEFAULT_TEST_SCALE) -> tuple[np.ndarray, dict]:
    """Load + keep-ratio resize: what visdet's test pipeline hands the data preprocessor."""
    img, meta = resize_keep_ratio(load_image(path), scale)
    meta["img_path"] = str(path)
    return img, meta


def pad_ground_truth(gts, g_max, hp, wp):
    """Host side: list of dicts (bboxes (k,4), labels (k,), masks (k,h,w) or None) -> padded arrays."""
    n = len(gts)
    boxes = np.zeros((n, g_max, 4), np.float32)
    labels = np.zeros((n, g_max), np.int32)
    valid = np.zeros((n, g_max), bool)
    masks = np.zeros((n, g_max, hp, wp), np.uint8)
    for i, gt in enumerate(gts):
        k = len(gt["bboxes"])
        if k > g_max:
            raise ValueError(f"image {i} has {k} GT boxes > capacity {g_max}; raise max_gt")
        boxes[i, :k] = gt["bboxes"]
        labels[i, :k] = gt["labels"]
        valid[i, :k] = True
        if gt.get("masks") is not None and k:
            m = np.asarray(gt["masks"])
            masks[i, :k, : m.shape[1], : m.shape[2]] = m
    return dict(gt_bboxes=boxes, gt_labels=labels, gt_valid=valid, gt_masks=masks)


def own_pad_shape(img_shape, divisor=32):
    return tuple(int(math.ceil(s / divisor)) * divisor for s in img_shape[:2])
