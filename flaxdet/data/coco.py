"""COCO-format instance datasets and visdet's default train pipeline, as static-shape batches.

Pipeline (visdet's Mask R-CNN train pipeline): load image (OpenCV, BGR) -> load annotations with
masks (polygons and RLE) -> keep-ratio resize to ``scale`` -> random horizontal flip (p=0.5) ->
pad (by the data preprocessor: zeros after normalisation).

**Deviation from visdet, on purpose**: visdet's training ``Resize`` leaves GT boxes and masks at the
original scale (a bug: training with any resize != 1 learns misplaced targets). flaxdet resizes the
GT boxes (x scale_factor) and masks (nearest) with the image.

Batches have static shapes: images are padded to a *bucket* -- (short, long) or (long, short) of the
padded ``scale`` depending on orientation -- and GT to ``max_gt`` rows with a valid mask, so a run
compiles at most two train-step executables. Bad data never becomes a silent wrong result: a
malformed annotation file raises :class:`DatasetError`; a missing/undecodable image, a degenerate or
out-of-image box, or an unknown category is skipped with a warning naming it.
"""
from __future__ import annotations

import json
import math
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from flaxdet.data.transforms import load_image, rescale_size


class DatasetError(ValueError):
    pass


@dataclass
class Record:
    image_id: int
    path: Path
    height: int
    width: int
    bboxes: np.ndarray  # (k, 4) xyxy, original frame
    labels: np.ndarray  # (k,) 0-based
    anns: list  # the raw annotations kept (for masks)


def _short(x, limit=80) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _segmentation_problem(seg, h, w):
    """What is wrong with an annotation's ``segmentation`` (polygons or RLE) for an h x w image, or None."""
    if seg is None:
        return None
    if isinstance(seg, list):
        if not seg:
            return "empty segmentation list (no polygon)"
        for poly in seg:
            if not isinstance(poly, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                     for v in poly):
                return f"a polygon that is not a list of numbers ({_short(poly)})"
            if len(poly) < 6 or len(poly) % 2:
                return (f"a polygon of {len(poly)} numbers (a polygon is x1, y1, x2, y2, ... with at least 3 points: "
                        "6 numbers)")
            if not all(math.isfinite(v) for v in poly):
                return "a polygon with non-finite coordinates"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2) or not isinstance(counts, str | list):
            return "an RLE needs 'size' [height, width] and 'counts'"
        if [size[0], size[1]] != [h, w]:
            return f"RLE size {_short(size)} differs from the image's [height, width] [{h}, {w}]"
        if isinstance(counts, list) and sum(c for c in counts if isinstance(c, int)) != h * w:
            return f"uncompressed RLE counts sum to {sum(c for c in counts if isinstance(c, int))}, not {h} x {w}"
        return None
    return f"segmentation is a {type(seg).__name__}, neither polygons (a list) nor an RLE (a dict)"


class CocoDataset:
    def __init__(self, ann_file, img_dir=None, classes=None, min_size: float = 1.0, skip_empty: bool = False):
        from pycocotools import mask as mask_utils  # noqa: F401  (fail early if missing)

        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir) if img_dir else self.ann_file.parent / "images"
        try:
            data = json.loads(self.ann_file.read_text())
        except FileNotFoundError:
            raise DatasetError(f"annotation file not found: {self.ann_file}") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.ann_file}: not valid JSON ({e})") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{self.ann_file}: not a COCO instances file (no '{key}' list)")
        if not data["categories"]:
            raise DatasetError(f"{self.ann_file}: 'categories' is empty; list the dataset's categories "
                               "([{\"id\": 1, \"name\": \"...\"}, ...])")
        bad_cat = next((c for c in data["categories"] if not (isinstance(c, dict) and isinstance(c.get("id"), int)
                                                            and isinstance(c.get("name"), str))), None)
        if bad_cat is not None:
            raise DatasetError(f"{self.ann_file}: malformed category {_short(bad_cat)}; each needs an integer "
                               "'id' and a 'name'")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.classes = list(classes) if classes else [c["name"] for c in cats]
        self.cat_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.data = data
        self.warnings: list[str] = []
        by_image: dict[int, list] = {}
        for a in data["annotations"]:
            by_image.setdefault(a.get("image_id"), []).append(a)
        self.records: list[Record] = []
        for im in data["images"]:
            try:
                iid, fname, h, w = im["id"], im["file_name"], int(im["height"]), int(im["width"])
            except (KeyError, TypeError, ValueError, OverflowError):
                raise DatasetError(f"{self.ann_file}: malformed image entry {_short(im)}; each needs 'id', "
                                   "'file_name', 'height' and 'width'") from None
            if h < 1 or w < 1:
                raise DatasetError(f"{self.ann_file}: image {_short(fname)} has size {w}x{h}; fix its width/height")
            path = self.img_dir / fname
            if not path.is_file():
                self._warn(f"missing image {path} (image id {iid}): skipped")
                continue
            boxes, labels, kept = [], [], []
            for a in by_image.get(iid, []):
                if a.get("iscrowd", 0):
                    continue
                if a.get("category_id") not in self.cat_to_label:
                    self._warn(f"annotation {a.get('id')} in {fname}: unknown category {a.get('category_id')}: skipped")
                    continue
                try:
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                except (KeyError, TypeError, ValueError):
                    raise DatasetError(f"{self.ann_file}: annotation {a.get('id')} has a malformed bbox") from None
                if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                    raise DatasetError(f"{self.ann_file}: annotation {_short(a.get('id'))} (image {fname}) has a "
                                       f"non-finite bbox {_short(a['bbox'])}; fix or remove the annotation")
                problem = _segmentation_problem(a.get("segmentation"), h, w)
                if problem:
                    raise DatasetError(f"{self.ann_file}: annotation {_short(a.get('id'))} (image {fname}): {problem}; "
                                       "fix it, or drop its 'segmentation' to train the mask on the box")
                x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
                if x2 - x1 < min_size or y2 - y1 < min_size:
                    self._warn(f"annotation {a.get('id')} in {fname}: degenerate box {a['bbox']}: skipped")
                    continue
                boxes.append([x1, y1, x2, y2])
                labels.append(self.cat_to_label[a["category_id"]])
                kept.append(a)
            if skip_empty and not boxes:
                continue
            self.records.append(Record(iid, path, h, w, np.asarray(boxes, np.float32).reshape(-1, 4),
                                       np.asarray(labels, np.int64), kept))
        if not self.records:
            raise DatasetError(f"{self.ann_file}: no usable images (see warnings: {self.warnings[:3]})")

    def _warn(self, msg):
        self.warnings.append(msg[:500])
        warnings.warn(msg, stacklevel=3)

    def __len__(self):
        return len(self.records)

    def masks(self, rec: Record) -> np.ndarray:
        from pycocotools import mask as mask_utils

        out = np.zeros((len(rec.anns), rec.height, rec.width), np.uint8)
        for i, a in enumerate(rec.anns):
            seg = a.get("segmentation")
            if seg is None:
                x1, y1, x2, y2 = rec.bboxes[i].astype(int)
                out[i, y1:y2, x1:x2] = 1
                continue
            if isinstance(seg, list):
                rles = mask_utils.frPyObjects(seg, rec.height, rec.width)
                rle = mask_utils.merge(rles)
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, rec.height, rec.width)
            else:
                rle = seg
            out[i] = mask_utils.decode(rle)
        return out


def decode_train_image(rec: Record) -> np.ndarray:
    """Decode record ``rec``'s image (BGR uint8; :class:`flaxdet.data.transforms.ImageError` when unreadable), warning
    when its size differs from the annotation's."""
    img = load_image(rec.path)
    h, w = img.shape[:2]
    if (h, w) != (rec.height, rec.width):
        warnings.warn(f"{rec.path}: size {w}x{h} differs from the annotation's {rec.width}x{rec.height}",
                      stacklevel=2)
    return img


def resize_train_sample(ds, rec: Record, img: np.ndarray, scale, with_masks=True):
    """visdet's keep-ratio ``Resize`` of a decoded image, with its GT boxes (x scale factor) and masks (nearest;
    ``ds.masks(rec)`` decodes them): (image, gt dict, meta), not flipped."""
    h, w = img.shape[:2]
    nw, nh = rescale_size(w, h, scale)
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    sx, sy = nw / w, nh / h
    boxes = rec.bboxes * np.array([sx, sy, sx, sy], np.float32)
    masks = None
    if with_masks:
        m = ds.masks(rec)
        masks = np.stack([cv2.resize(x, (nw, nh), interpolation=cv2.INTER_NEAREST) for x in m]) if len(m) \
            else np.zeros((0, nh, nw), np.uint8)
    meta = dict(ori_shape=(h, w), img_shape=(nh, nw), scale_factor=(sx, sy, sx, sy), flip=False)
    return img, dict(bboxes=boxes, labels=rec.labels, masks=masks), meta


def flip_train_sample(img, gt, meta):
    """visdet's horizontal ``RandomFlip`` applied: image, GT boxes and masks mirrored."""
    nw = img.shape[1]
    boxes = gt["bboxes"]
    img = img[:, ::-1].copy()
    boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1) if len(boxes) else boxes
    masks = gt["masks"][:, :, ::-1].copy() if gt["masks"] is not None else None
    return img, dict(gt, bboxes=boxes, masks=masks), dict(meta, flip=True)


def load_train_sample(ds: CocoDataset, rec: Record, scale, flip: bool, with_masks=True):
    """One image through the train pipeline: (image, gt dict, meta). GT is resized with the image."""
    sample = resize_train_sample(ds, rec, decode_train_image(rec), scale, with_masks)
    return flip_train_sample(*sample) if flip else sample


def bucket_for(img_shape, scale, divisor=32):
    long_, short = max(scale), min(scale)
    lp, sp = math.ceil(long_ / divisor) * divisor, math.ceil(short / divisor) * divisor
    return (sp, lp) if img_shape[1] >= img_shape[0] else (lp, sp)


def collate(samples, bucket, max_gt, divisor=32):
    from flaxdet.data.transforms import own_pad_shape, pad_ground_truth

    hp, wp = bucket
    n = len(samples)
    images = np.zeros((n, hp, wp, 3), np.uint8)
    for i, (img, _, _) in enumerate(samples):
        images[i, : img.shape[0], : img.shape[1]] = img
    gts = [s[1] for s in samples]
    for i, g in enumerate(gts):
        if len(g["bboxes"]) > max_gt:
            warnings.warn(f"image {i}: {len(g['bboxes'])} GT boxes > max_gt={max_gt}; keeping the first {max_gt}",
                          stacklevel=2)
            gts[i] = {k: (v[:max_gt] if v is not None else None) for k, v in g.items()}
    batch = dict(images=images, img_shapes=np.array([s[2]["img_shape"] for s in samples], np.int32),
                 pad_shapes=np.array([own_pad_shape(s[2]["img_shape"], divisor) for s in samples], np.int32))
    batch.update(pad_ground_truth(gts, max_gt, hp, wp))
    return batch


class TrainLoader:
    """Deterministic, resumable batches: epoch e uses permutation(seed, e); sample i of step s flips
    by a hash of (seed, s, i). ``batches(start_step)`` yields (step, batch) from any step, decoded in a
    background thread (``prefetch`` batches ahead) so the device is not waiting on OpenCV.

    An image that cannot be read at training time (undecodable, or gone since the dataset was indexed) is skipped
    with a warning naming it, once: its slot takes the next readable image of the epoch's order (deterministic, so
    a resumed run sees the same batches). ``skipped[step]`` lists the images step ``step`` skipped (the train loop
    records the count in its metrics); ``bad`` holds every unreadable record index seen."""

    def __init__(self, ds: CocoDataset, batch_size, scale, max_gt=100, seed=0, flip_prob=0.5, prefetch=2,
                 with_masks=True):
        self.ds, self.batch_size, self.scale, self.max_gt = ds, batch_size, tuple(scale), max_gt
        self.seed, self.flip_prob, self.prefetch, self.with_masks = seed, flip_prob, prefetch, with_masks
        self.steps_per_epoch = max(1, len(ds) // batch_size)
        self.skipped: dict[int, list[str]] = {}
        self.bad: set[int] = set()

    def indices(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
        return perm[k * self.batch_size:(k + 1) * self.batch_size], epoch

    def _load(self, i, flip, step, note=True):
        """Record ``i``'s sample, or None (warned once; noted in ``skipped[step]`` with ``note``) when its image is
        unreadable."""
        from flaxdet.data.transforms import ImageError

        rec = self.ds.records[i]
        if i not in self.bad:
            try:
                return load_train_sample(self.ds, rec, self.scale, flip, self.with_masks)
            except ImageError as e:
                self.bad.add(i)
                warnings.warn(f"{e}: skipped (training continues without it)", stacklevel=2)
        if note:
            self.skipped.setdefault(step, []).append(str(rec.path))
        return None

    def make_batch(self, step):
        idx, epoch = self.indices(step)
        rng = np.random.default_rng([self.seed, 1, step])
        flips = [rng.uniform() < self.flip_prob for _ in idx]
        samples = [self._load(i, f, step) for i, f in zip(idx, flips)]
        if any(s is None for s in samples):  # fill the slots with the next readable images of the epoch's order
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
            start = int(np.flatnonzero(perm == idx[-1])[0]) + 1
            candidates = (int(perm[(start + j) % len(perm)]) for j in range(len(perm)))
            used = set(int(i) for i in idx)
            for slot, s in enumerate(samples):
                while s is None:
                    j = next(candidates, None)
                    if j is None:
                        raise DatasetError(f"{self.ds.ann_file}: no readable image left to fill a batch "
                                           f"(unreadable: {len(self.bad)} of {len(self.ds)})")
                    if j in used or j in self.bad:
                        continue
                    used.add(j)
                    s = self._load(j, flips[slot], step, note=False)  # counted where it has its own slot
                samples[slot] = s
        # one bucket per batch: the orientation of the first image decides, others are resized to fit
        bucket = bucket_for(samples[0][2]["img_shape"], self.scale)
        return collate(fit_to_bucket(samples, bucket), bucket, self.max_gt), epoch

    def batches(self, start_step, num_steps):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for s in range(start_step, start_step + num_steps):
                    if stop.is_set():
                        return
                    q.put((s, *self.make_batch(s)))
            except BaseException as e:  # surface loader errors in the consumer
                q.put(e)
            q.put(None)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def fit_to_bucket(samples, bucket):
    """The batch's samples with any image larger than ``bucket`` (the other orientation) shrunk into it."""
    return [_fit(*s, bucket) if s[0].shape[0] > bucket[0] or s[0].shape[1] > bucket[1] else s for s in samples]


def _fit(img, gt, meta, bucket):
    """Shrink an image of the other orientation into the batch's bucket (keep ratio)."""
    h, w = img.shape[:2]
    s = min(bucket[0] / h, bucket[1] / w)
    nw, nh = max(1, int(w * s)), max(1, int(h * s))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    sx, sy = nw / w, nh / h
    gt = dict(gt, bboxes=gt["bboxes"] * np.array([sx, sy, sx, sy], np.float32))
    if gt.get("masks") is not None and len(gt["masks"]):
        gt["masks"] = np.stack([cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST) for m in gt["masks"]])
    elif gt.get("masks") is not None:
        gt["masks"] = np.zeros((0, nh, nw), np.uint8)
    return img, gt, dict(meta, img_shape=(nh, nw))
