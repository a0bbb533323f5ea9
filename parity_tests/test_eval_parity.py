"""COCO evaluation parity: flaxdet's mAP equals reference/'s mAP on the same weights and data.

Data: the three golden photos, with ground truth taken from reference/'s own confident detections
(so the mAP is high and any disagreement between the two implementations shows up in it)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from flaxdet.config import load_config
from flaxdet.evaluation import evaluate
from flaxdet.models import build_detector as build_flax
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import load_visdet_state_dict
from flaxdet_reference import build_detector as build_ref
from flaxdet_reference.models import load_state_dict_strict
from parity_tests.goldens import GOLDENS, IMAGES, golden_image, require_goldens

pytestmark = pytest.mark.goldens


@pytest.mark.parametrize("case", ["mask_rcnn_tiny_r18"])
def test_map_flaxdet_equals_reference(case, tmp_path):
    require_goldens()
    from pycocotools import mask as mask_utils

    cfg = load_config(GOLDENS / case / "config.yaml")
    sd = load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict
    ref = build_ref(cfg)
    load_state_dict_strict(ref, sd)
    images, anns = [], []
    (tmp_path / "images").mkdir()
    for i, name in enumerate(IMAGES):
        g = golden_image(case, name)
        img = g["input_bgr_uint8"]  # fed at its own size: scale = (max, min) keeps it
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), img)
        h, w = img.shape[:2]
        meta = dict(ori_shape=(h, w), img_shape=(h, w), scale_factor=(1.0, 1.0, 1.0, 1.0))
        r = ref.predict([torch.from_numpy(img).permute(2, 0, 1).contiguous()], [meta])[0]
        images.append(dict(id=i + 1, file_name=f"{name}.png", height=h, width=w))
        for b, s, lab, m in zip(r["bboxes"].numpy(), r["scores"].numpy(), r["labels"].numpy(), r["masks"].numpy()):
            if s < 0.5 or m.sum() == 0:
                continue
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(lab) + 1, iscrowd=0,
                             bbox=[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                             area=float(m.sum()), segmentation=rle))
    assert len(anns) >= 10
    cats = [dict(id=c + 1, name=f"class_{c}") for c in range(cfg.roi_head.bbox_head.num_classes)]
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))

    flax = build_flax(cfg)
    load_visdet_state_dict(flax, sd)
    results = {}
    for backend, model in (("reference", ref), ("flaxdet", flax)):
        # each golden image at its own size: evaluate with a scale that keeps it (per image)
        ms = []
        for i, name in enumerate(IMAGES):
            one = tmp_path / f"gt_{name}.json"
            one.write_text(json.dumps(dict(images=[images[i]], annotations=[a for a in anns if a["image_id"] == i + 1],
                                           categories=cats)))
            h, w = images[i]["height"], images[i]["width"]
            ms.append(evaluate(model, one, tmp_path / "images", scale=(max(h, w), min(h, w)), backend=backend,
                               progress=False))
        results[backend] = ms
    for i, name in enumerate(IMAGES):
        r, f = results["reference"][i], results["flaxdet"][i]
        assert r["bbox_mAP"] > 0.5, (name, r["bbox_mAP"])  # the construction makes the reference score high
        for k in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"):
            assert abs(r[k] - f[k]) <= 0.001, (name, k, r[k], f[k])  # 0.1 AP (on the 0-100 scale)
