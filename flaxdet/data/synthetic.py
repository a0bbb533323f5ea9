"""A seeded synthetic COCO-format instance dataset: coloured shapes on textured backgrounds.

Each image holds 1-6 non-overlapping, non-degenerate shapes (classes ``circle``, ``square``, ``triangle`` by default)
with polygon segmentations; a fraction of annotations is written as uncompressed RLE instead, so
loaders see both encodings. Same seed, same bytes.

    python -m flaxdet.data.synthetic OUT_DIR --num-images 40 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle")


def _polygon(kind, cx, cy, r, angle):
    if kind == "circle":
        t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    else:
        n = 4 if kind == "square" else 3
        t = angle + np.arange(n) * 2 * math.pi / n
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    return pts


def class_color(index):
    """A class's base colour (BGR), the same for every seed: a train set and a val set made with different
    seeds must share the appearance of a class (per-seed colours made val mAP collapse: the model learns
    colour as the cheapest cue)."""
    return tuple(int(c) for c in np.random.default_rng(7919 + index).integers(30, 255, 3))


def _background(rng, h, w):
    base = rng.integers(40, 200, 3)
    gy, gx = np.mgrid[0:h, 0:w]
    grad = (gx / w * rng.uniform(-60, 60) + gy / h * rng.uniform(-60, 60))[..., None]
    noise = cv2.GaussianBlur(rng.normal(0, 25, (h, w, 3)).astype(np.float32), (0, 0), 3)
    return np.clip(base + grad + noise, 0, 255).astype(np.uint8)


def _rle_uncompressed(mask):
    """COCO uncompressed RLE (column-major run lengths starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def make_synthetic_coco(out_dir, num_images=40, seed=0, classes=CLASSES, min_size=(192, 256),
                        max_size=(320, 448), rle_fraction=0.2, max_objects=6):
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json``; returns the JSON path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = [class_color(i) for i in range(len(classes))]
    images, anns = [], []
    for i in range(num_images):
        h = int(rng.integers(min_size[0], max_size[0] + 1))
        w = int(rng.integers(min_size[1], max_size[1] + 1))
        img = _background(rng, h, w)
        occupied = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, max_objects + 1))):
            c = int(rng.integers(len(classes)))
            r = float(rng.uniform(14, min(h, w) / 4))
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            pts = _polygon(classes[c], cx, cy, r, rng.uniform(0, math.pi))
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
            mask = mask.astype(bool)
            if (mask & occupied).any() or mask.sum() < 60:  # no occlusion: the polygon is the mask
                continue
            occupied |= mask
            jitter = rng.integers(-25, 25, 3)
            img[mask] = np.clip(np.array(colors[c]) + jitter, 0, 255).astype(np.uint8)
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
            ann = dict(id=len(anns) + 1, image_id=i + 1, category_id=c + 1, iscrowd=0, area=float(mask.sum()),
                       bbox=[x0, y0, x1 - x0, y1 - y0])
            if rng.uniform() < rle_fraction:
                ann["segmentation"] = _rle_uncompressed(mask)
            else:
                ann["segmentation"] = [[round(float(v), 2) for v in pts.reshape(-1)]]
            anns.append(ann)
        name = f"{i:05d}.png"
        cv2.imwrite(str(out / "images" / name), img)
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
    coco = dict(images=images, annotations=anns,
                categories=[dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(classes)])
    path = out / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--num-images", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_synthetic_coco(a.out_dir, a.num_images, a.seed))


if __name__ == "__main__":
    main()
