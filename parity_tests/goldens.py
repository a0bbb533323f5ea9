"""Access to ../shared/goldens (recorded from the real visdet). Read in place, never copied.

Every test that reads the goldens is marked ``@pytest.mark.goldens`` (module ``pytestmark`` or per test) and
reaches them through this module. Environment:

- ``FLAXDET_GOLDENS=DIR``: read the goldens from DIR instead of ../shared/goldens beside the repo;
- ``FLAXDET_REQUIRE_GOLDENS=1``: missing goldens fail the marked tests instead of skipping them (CI: .ci/run).

conftest.py applies :func:`require_goldens` to every marked test before its fixtures run, and tells this module
which test is running: a test that is not marked but calls the helpers here fails, naming itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

DEFAULT_GOLDENS = Path(__file__).resolve().parents[1].parent / "shared" / "goldens"
GOLDENS = Path(os.environ.get("FLAXDET_GOLDENS") or DEFAULT_GOLDENS)
CASES = ("mask_rcnn_tiny_r18", "mask_rcnn_tiny_r50")
IMAGES = ("coco_test_12510", "voc_000001", "color")
WEIGHT_FILES = ("state_dict.pth", "checkpoint.pth", "model.safetensors")
MARKER = "goldens"

# The pytest item being set up / run / torn down (set by conftest.py); None outside a test.
current_test = None


def goldens_required() -> bool:
    """FLAXDET_REQUIRE_GOLDENS is set to something other than '', '0', 'false', 'no'."""
    return os.environ.get("FLAXDET_REQUIRE_GOLDENS", "").strip().lower() not in ("", "0", "false", "no")


def goldens_present() -> bool:
    return (GOLDENS / "README.md").is_file()


def require_goldens():
    """Skip the running test when the goldens are missing -- or fail it under FLAXDET_REQUIRE_GOLDENS=1.
    Fails a running test that is not marked ``goldens`` (it would escape ``-m goldens`` selection)."""
    item = current_test
    if item is not None and item.get_closest_marker(MARKER) is None:
        pytest.fail(f"{item.nodeid} reads the goldens but is not marked @pytest.mark.{MARKER} "
                    f"(add the mark to the test or the module's pytestmark)", pytrace=False)
    if goldens_present():
        return
    where = (f"$FLAXDET_GOLDENS={os.environ['FLAXDET_GOLDENS']}" if os.environ.get("FLAXDET_GOLDENS")
             else "expected ../shared/goldens beside the repo, or set FLAXDET_GOLDENS")
    msg = f"visdet goldens not found at {GOLDENS} ({where})"
    if goldens_required():
        pytest.fail(f"{msg}; FLAXDET_REQUIRE_GOLDENS=1 makes missing goldens a failure", pytrace=False)
    pytest.skip(msg)


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
