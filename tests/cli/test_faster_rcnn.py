"""Faster R-CNN (no mask branch) through the real CLI, the whole user story: a visdet checkpoint saved by
reference/ -> ``flaxdet convert`` -> ``flaxdet parity`` -> ``flaxdet infer`` -> ``flaxdet train`` ->
``flaxdet eval`` (flaxdet and reference/ backends on the same weights) -> ``flaxdet export``.

The model is the ``faster_rcnn_r50`` preset scaled down (parity_tests.test_architectures.shrink: the
same Bottleneck ResNet-50, FPN and Shared2FC head with fewer channels), seeded well-conditioned weights.
``slow``: five processes, each compiling its own graphs (~4 min on two cores); ``make test-slow``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from flaxdet.config import dump_yaml, load_config
from flaxdet.data.synthetic import make_synthetic_coco
from flaxdet_converters.checkpoint_io import load_checkpoint, save_checkpoint
from flaxdet_reference import build_detector as build_ref
from parity_tests.test_architectures import conditioned, shrink

pytestmark = pytest.mark.slow
SCALE = ("160", "128")


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "flaxdet.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, f"flaxdet {args[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_faster_rcnn_user_story(tmp_path):
    cfg = shrink(load_config("faster_rcnn_r50"), classes=3)
    assert cfg.roi_head.mask_head is None
    cfg_path = tmp_path / "faster.yaml"
    cfg_path.write_text(dump_yaml(cfg))
    ref = build_ref(cfg).eval()
    sd = conditioned(ref, seed=0)
    ckpt = save_checkpoint(tmp_path / "faster.pth", sd,
                           classes=["circle", "square", "triangle"])
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:150, :196]
    img = np.stack([127 + 100 * np.sin(xx / 9.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], -1)
    img = (img + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), img)

    # convert (strict: every key accounted for)
    model = tmp_path / "model"
    r = _cli("convert", ckpt, "--config", cfg_path, "--out", model)
    assert model.is_dir(), r.stdout

    # parity against reference/ on the image, at its own size
    r = _cli("parity", "--checkpoint", ckpt, "--config", cfg_path, "--image", photo, "--out", tmp_path / "parity",
             "--against", "reference", "--scale", 196, 150)
    rep = json.loads((tmp_path / "parity" / "parity.json").read_text())
    assert rep["passed"], r.stdout[-4000:]
    assert not any("mask" in row["stage"] for row in rep["stages"]), "Faster R-CNN has no mask rows"

    # infer: boxes, no masks; the same detections as reference/ on the same file
    r = _cli("infer", "--checkpoint", model, "--images", photo, "--out", tmp_path / "infer", "--scale", 196, 150,
             "--score-thr", "0.05", "--no-progress")
    dets = json.loads((tmp_path / "infer" / "results.json").read_text())
    assert len(dets) > 5 and all("segmentation" not in d for d in dets), r.stdout[-2000:]
    with torch.no_grad():
        meta = dict(ori_shape=(150, 196), img_shape=(150, 196), scale_factor=(1.0, 1.0, 1.0, 1.0))
        out = ref.predict([torch.from_numpy(img).permute(2, 0, 1).contiguous()], [meta])
    t_scores = out[0]["scores"].numpy()
    assert len(dets) == int((t_scores >= 0.05).sum())

    # fine-tune on a synthetic COCO set, then evaluate with both backends on the fine-tuned weights
    size = (128, 160)
    train_ann = make_synthetic_coco(tmp_path / "train", 8, seed=0, min_size=size, max_size=size)
    val_ann = make_synthetic_coco(tmp_path / "val", 4, seed=1, min_size=size, max_size=size)
    r = _cli("train", "--checkpoint", model, "--ann", train_ann, "--out", tmp_path / "run", "--steps", 4,
             "--batch-size", 2, "--scale", *SCALE, "--optimizer", "adamw", "--warmup-iters", 1, "--ckpt-every", 2,
             "--max-gt", 8, "--no-progress")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    steps = [m for m in log if "loss" in m]
    assert len(steps) >= 4 and all(np.isfinite(m["loss"]) for m in steps), log
    assert not any("loss_mask" in m for m in steps)
    tuned = tmp_path / "run" / "model"
    maps = {}
    for backend in ("flaxdet", "reference"):
        r = _cli("eval", "--checkpoint", tuned, "--ann", val_ann, "--scale", *SCALE, "--backend", backend,
                 "--out", tmp_path / f"eval_{backend}", "--no-progress")
        metrics = json.loads((tmp_path / f"eval_{backend}" / "metrics.json").read_text())
        assert "bbox_mAP" in metrics and "segm_mAP" not in metrics, metrics
        maps[backend] = metrics["bbox_mAP"]
    assert abs(maps["flaxdet"] - maps["reference"]) <= 0.001, maps  # 0.1 AP

    # back to visdet: the fine-tuned weights load strictly into reference/
    r = _cli("export", tuned, "--out", tmp_path / "back.pth")
    back = load_checkpoint(tmp_path / "back.pth")
    assert back.classes == ["circle", "square", "triangle"]
    build_ref(cfg).load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.state_dict.items()},
                                   strict=True)
