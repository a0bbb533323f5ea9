"""Access to ../shared/goldens (recorded from the real visdet). Read in place, never copied."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

GOLDENS = Path(__file__).resolve().parents[1].parent / "shared" / "goldens"
CASES = ("mask_rcnn_tiny_r18", "mask_rcnn_tiny_r50")
IMAGES = ("coco_test_12510", "voc_000001", "color")
WEIGHT_FILES = ("state_dict.pth", "checkpoint.pth", "model.safetensors")


def require_goldens():
    if not (GOLDENS / "README.md").is_file():
        pytest.skip(f"goldens not found at {GOLDENS} (expected ../shared/goldens beside the repo)")


@dataclass
class GoldenImage:
    case: str
    name: str
    arrays: dict
    meta: dict  # ori_shape, img_shape, scale_factor (visdet's test-time metainfo)

    def __getitem__(self, key):
        return self.arrays[key]

    @property
    def det(self):
        return {k: self.arrays[f"det.{k}"] for k in ("bboxes", "scores", "labels", "masks")}


def golden_image(case: str, name: str) -> GoldenImage:
    require_goldens()
    man = json.loads((GOLDENS / case / "manifest.json").read_text())["images"][name]
    with np.load(GOLDENS / case / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = dict(ori_shape=tuple(man["ori_shape"]), img_shape=tuple(man["img_shape"]),
                scale_factor=tuple(man["scale_factor"]))
    return GoldenImage(case, name, arrays, meta)


def config_path(case: str) -> Path:
    require_goldens()
    return GOLDENS / case / "config.yaml"
