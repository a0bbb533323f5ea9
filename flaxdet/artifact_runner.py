"""Run a flaxdet StableHLO artifact (``flaxdet export DIR --format stablehlo``) with jax and numpy only.

This file is copied into every artifact as ``run_artifact.py`` and imports neither flaxdet nor Flax: jax,
numpy, and OpenCV (``cv2``) to decode and resize images the way flaxdet (and visdet) does -- only when given
file paths or images to resize.

    python ART/run_artifact.py ART photo.jpg [more.jpg ...]      # prints the detections as JSON lines

    import sys; sys.path.insert(0, "ART"); import run_artifact
    model = run_artifact.Artifact("ART")
    for det in model(["a.jpg", "b.jpg"]):      # or (H, W, 3) uint8 BGR arrays
        det["boxes"], det["scores"], det["labels"], det["class_names"], det.get("masks")

An image whose own padded size (its keep-ratio resized size rounded up to the manifest's ``pad_size_divisor``)
is the artifact's shape bucket gets exactly ``flaxdet infer``'s detections; a smaller one is padded to the
bucket (as ``flaxdet infer --bucket coarse`` pads: features within a few pixels of the padded border differ by
float noise); a larger one is an error. Batches of fewer images than the artifact's batch are filled with
zero images, whose detections are dropped.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from jax import export

__all__ = ["Artifact", "resize_keep_ratio"]


def resize_keep_ratio(img, scale):
    """visdet's keep-ratio resize (OpenCV bilinear): (resized image, meta with ori_shape, img_shape, scale_factor)."""
    import cv2

    h, w = img.shape[:2]
    sf = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_w, new_h = int(w * float(sf) + 0.5), int(h * float(sf) + 0.5)
    out = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    f = np.array([new_w / w, new_h / h, new_w / w, new_h / h], np.float32)
    return out, dict(ori_shape=(h, w), img_shape=(new_h, new_w), scale_factor=tuple(float(v) for v in f))


def load_image(path):
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot decode image {path}")
    return img


class Artifact:
    """A loaded artifact. ``artifact(image)`` -> one detections dict, ``artifact([...])`` -> a list; an image is a
    path or an (H, W, 3) uint8 BGR array (decoded and resized here), see :meth:`predict` for resized inputs."""

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = m = json.loads((self.path / "manifest.json").read_text())
        if m.get("format") != "flaxdet-stablehlo":
            raise ValueError(f"{self.path} is not a flaxdet StableHLO artifact (manifest format {m.get('format')!r})")
        self.batch = int(m["batch"])
        self.shape = tuple(m["inputs"]["images"]["shape"][1:3])
        self.scale = tuple(m["preprocessing"]["resize"]["scale"])
        self.divisor = int(m["preprocessing"]["pad_size_divisor"])
        self.classes = m.get("classes")
        with np.load(self.path / m["weights"]) as z:
            self.weights = [jax.device_put(z[f"w{i:05d}"]) for i in range(int(m["num_weights"]))]
        self._fns = {}

    def _fn(self, name):
        if name not in self._fns:
            f = self.manifest["functions"]
            file = f["masks"][name.split("_")[-1]] if name.startswith("masks_rows_") else f[name]
            self._fns[name] = export.deserialize(bytearray((self.path / file).read_bytes()))
        return self._fns[name]

    def __call__(self, images):
        single = isinstance(images, str | Path | np.ndarray)
        items = [images] if single else list(images)
        out = []
        for start in range(0, len(items), self.batch):
            prepared = [resize_keep_ratio(load_image(x) if isinstance(x, str | Path) else np.asarray(x), self.scale)
                        for x in items[start:start + self.batch]]
            out += self.predict([p[0] for p in prepared], [p[1] for p in prepared])
        return out[0] if single else out

    def predict(self, resized, metas):
        """Up to ``batch`` keep-ratio resized images and their metas (ori_shape, img_shape, scale_factor) ->
        per image dict(boxes (K, 4) float32, scores (K,), labels (K,) int64, class_names [+ masks (K, h, w) bool])
        in original pixels, best first."""
        n, (hp, wp) = len(resized), self.shape
        if not 0 < n <= self.batch:
            raise ValueError(f"this artifact takes 1 to {self.batch} images per call, got {n}")
        images = np.zeros((self.batch, hp, wp, 3), np.uint8)
        shapes = np.tile(np.array([hp, wp], np.int32), (self.batch, 1))
        sfs = np.ones((self.batch, 4), np.float32)
        for i, (im, meta) in enumerate(zip(resized, metas)):
            h, w = im.shape[:2]
            if h > hp or w > wp:
                raise ValueError(f"a resized image of {h}x{w} does not fit this artifact's {hp}x{wp} bucket "
                                 f"(export one for {math.ceil(h / self.divisor) * self.divisor}x"
                                 f"{math.ceil(w / self.divisor) * self.divisor})")
            canvas = self.manifest.get("canvas")
            if canvas and (meta["ori_shape"][0] > canvas[0] or meta["ori_shape"][1] > canvas[1]):
                raise ValueError(f"an original image of {meta['ori_shape'][0]}x{meta['ori_shape'][1]} is larger than "
                                 f"this artifact's mask canvas {canvas[0]}x{canvas[1]} (export with a larger --canvas)")
            images[i, :h, :w] = im
            shapes[i] = (h, w)
            sf = list(meta["scale_factor"])
            sfs[i] = sf if len(sf) == 4 else sf[:2] * 2
        dets = self._run(images, shapes, sfs, n)
        return [self._unpad(dets, i, meta["ori_shape"]) for i, meta in enumerate(metas)]

    def _run(self, images, shapes, sfs, n):
        f = self.manifest["functions"]
        if "predict" in f:
            return jax.device_get(self._fn("predict").call(self.weights, images, shapes, sfs))
        dets, neck = self._fn("boxes").call(self.weights, images, shapes, sfs)
        count = int(np.asarray(dets["valid"])[:n].sum(1).max())  # the real images' (the filler's are dropped)
        if count == 0:  # no detection: nothing for the mask branch
            return jax.device_get(dict(dets, masks=None))
        rows = min(k for k in self.manifest["mask_rows"] if k >= count)
        return jax.device_get(self._fn(f"masks_rows_{rows}").call(self.weights, neck, dets, sfs))

    def _unpad(self, dets, i, ori):
        v = np.asarray(dets["valid"][i])
        r = {"boxes": np.asarray(dets["bboxes"][i])[v], "scores": np.asarray(dets["scores"][i])[v],
             "labels": np.asarray(dets["labels"][i])[v].astype(np.int64)}
        r["class_names"] = [self.classes[k] if self.classes and k < len(self.classes) else str(int(k))
                            for k in r["labels"]]
        if self.manifest.get("masks"):
            h, w = ori[:2]
            if dets.get("masks") is None:
                r["masks"] = np.zeros((0, h, w), bool)
            else:
                m, c = np.asarray(dets["masks"][i]), int(v.sum())
                r["masks"] = np.array(m[:c, :h, :w]) if v[:c].all() else m[v][:, :h, :w]
        return r


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python run_artifact.py ARTIFACT_DIR IMAGE [IMAGE ...]", file=sys.stderr)
        return 2
    art = Artifact(argv[0])
    for path, det in zip(argv[1:], art(argv[1:])):
        print(json.dumps(dict(image=path, boxes=det["boxes"].tolist(), scores=det["scores"].tolist(),
                              labels=det["labels"].tolist(), class_names=det["class_names"],
                              mask_pixels=[int(m.sum()) for m in det["masks"]] if "masks" in det else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
