"""`make demo` / `make demo-rtmdet`: the whole user story on a small model, on CPU, in a few minutes.

``python -m flaxdet.demo`` (``--family mask_rcnn``, `make demo`) runs it on a small Mask R-CNN;
``--family rtmdet_ins`` (`make demo-rtmdet`) on a tiny RTMDet-Ins:

1. a visdet checkpoint: the recorded visdet test case in ../shared/goldens (``mask_rcnn_tiny_r18`` /
   ``rtmdet/rtmdet_ins_tiny``, a runner-style ``checkpoint.pth``) when present, otherwise a small model of the
   same architecture saved as a visdet checkpoint by reference/ from seeded weights (so the demo needs nothing
   outside the repo);
2. ``flaxdet convert`` it;
3. ``flaxdet parity``: the per-stage table, PyTorch reference vs flaxdet under jit;
4. a synthetic COCO-format set (coloured shapes, polygon + RLE masks): train and val splits;
5. COCO mAP before fine-tuning, fine-tuning in JAX, mAP after -- flaxdet's and reference/'s on the
   same fine-tuned weights;
6. an overlay PNG of the fine-tuned model, and ``flaxdet export`` back to a visdet checkpoint; a summary
   (printed, and ``summary.json``).

Environment knobs: FLAXDET_DEMO_STEPS (default 150 for Mask R-CNN, 400 for RTMDet-Ins), FLAXDET_DEMO_OUT
(default out/demo, out/demo-rtmdet), FLAXDET_GOLDENS (the goldens folder, default ../shared/goldens).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = Path(os.environ.get("FLAXDET_GOLDENS") or ROOT.parent / "shared" / "goldens")
GOLDEN = GOLDENS / "mask_rcnn_tiny_r18"
SCALE = (160, 128)  # synthetic images are 128x160: no resize, one compiled shape, ~4x cheaper steps than 256x320
CLASSES = ("circle", "square", "triangle")  # flaxdet.data.synthetic's


@dataclasses.dataclass(frozen=True)
class Leg:
    """One model family's demo: where its visdet checkpoint comes from and how it is fine-tuned."""

    title: str
    golden: Path  # the recorded visdet case (checkpoint.pth, config.yaml, color.npz)
    seeded: object  # () -> (cfg, state_dict): the fallback model of the same architecture, seeded
    out: str  # default output folder under out/
    steps: int  # default FLAXDET_DEMO_STEPS
    train: dict  # TrainConfig fields: batch_size, optimizer, lr, ema, ...
    warmup: object  # steps -> warmup_iters


def _seeded_mask_rcnn():
    from flaxdet.config import load_config

    cfg = load_config("mask_rcnn_r50")
    small = dataclasses.replace(cfg.backbone, depth=18, base_channels=16)
    neck = dataclasses.replace(cfg.neck, in_channels=(16, 32, 64, 128), out_channels=32)
    return dataclasses.replace(cfg, backbone=small, neck=neck,
                               rpn_head=dataclasses.replace(cfg.rpn_head, in_channels=32, feat_channels=32)), 80


def _seeded_rtmdet_ins():
    """The goldens' rtmdet_ins_tiny architecture: the rtmdet_ins_tiny preset at widen 0.0625, 16-channel neck and
    head, 4 classes (their README, ``changed_from_preset``)."""
    from flaxdet.config import load_config

    cfg = load_config("rtmdet_ins_tiny")
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, widen_factor=0.0625),
        neck=dataclasses.replace(cfg.neck, in_channels=(16, 32, 64), out_channels=16),
        bbox_head=dataclasses.replace(cfg.bbox_head, in_channels=16, feat_channels=16, num_classes=4)), 4


LEGS = {
    # measured: a 30-step warm-up (honoured since AdamW has one) cost ~0.08 bbox mAP at 150 steps
    "mask_rcnn": Leg("Mask R-CNN", GOLDEN, _seeded_mask_rcnn, "demo", 150,
                     dict(batch_size=4, optimizer="adamw", lr=1e-3), lambda steps: 0),
    # upstream RTMDet's recipe (AdamW without decay on norms and biases, warm-up, cosine over the second half,
    # EMA of the weights) at 2x its lr: 400 steps of batch 8 in about a minute on 2 cores (docs/training.md)
    "rtmdet_ins": Leg("RTMDet-Ins", GOLDENS / "rtmdet" / "rtmdet_ins_tiny", _seeded_rtmdet_ins, "demo-rtmdet", 400,
                      dict(batch_size=8, optimizer="rtmdet_adamw", lr=8e-3, ema=True),
                      lambda steps: min(30, max(steps // 5, 1))),
}


def _visdet_checkpoint(out: Path, leg: Leg = LEGS["mask_rcnn"]):
    if (leg.golden / "checkpoint.pth").is_file():
        with np.load(leg.golden / "color.npz") as z:
            img = z["input_bgr_uint8"]
        print(f"[demo] visdet checkpoint: {leg.golden / 'checkpoint.pth'} (recorded visdet case)")
        return leg.golden / "checkpoint.pth", leg.golden / "config.yaml", img
    import torch

    from flaxdet.config import dump_yaml
    from flaxdet_converters.checkpoint_io import save_checkpoint
    from flaxdet_reference import build_detector

    cfg, num_classes = leg.seeded()
    torch.manual_seed(0)
    ref = build_detector(cfg)
    ckpt, cfg_path = out / "seeded_visdet.pth", out / "seeded_visdet.yaml"
    cfg_path.write_text(dump_yaml(cfg))
    save_checkpoint(ckpt, {k: v.numpy() for k, v in ref.state_dict().items()},
                    classes=[f"c{i}" for i in range(num_classes)])
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (288, 512, 3), dtype=np.uint8), (0, 0), 6)
    print(f"[demo] no goldens found; wrote a seeded visdet checkpoint {ckpt}")
    return ckpt, cfg_path, img


def _f(v):
    """A metric for printing: pycocotools' undefined (None) and a missing task (no detections) print as 0."""
    return f"{v or 0.0:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(LEGS), default="mask_rcnn",
                   help="mask_rcnn (`make demo`) or rtmdet_ins (`make demo-rtmdet`)")
    leg = LEGS[p.parse_args(argv).family]

    from flaxdet.checkpoint import load_model_dir
    from flaxdet.cli import enable_compile_cache
    from flaxdet.data.synthetic import make_synthetic_coco
    from flaxdet.evaluation import evaluate
    from flaxdet.tools import convert_checkpoint, export_model_dir, run_infer, run_parity
    from flaxdet.training.loop import TrainConfig, adapt_num_classes, train
    from flaxdet_converters.checkpoint_io import load_checkpoint

    enable_compile_cache()  # a second `make demo` skips XLA compilation
    out = Path(os.environ.get("FLAXDET_DEMO_OUT", ROOT / "out" / leg.out))
    out.mkdir(parents=True, exist_ok=True)
    steps = int(os.environ.get("FLAXDET_DEMO_STEPS", leg.steps))
    t0 = time.time()
    ckpt, cfg, img = _visdet_checkpoint(out, leg)
    image = out / "photo.png"
    cv2.imwrite(str(image), img)

    print(f"\n[demo] 1/6 convert the visdet checkpoint ({leg.title})")
    model_dir, report = convert_checkpoint(ckpt, cfg, out / "model", overwrite=True)
    print(report.summary(), f"-> {model_dir}")

    print("\n[demo] 2/6 parity: PyTorch reference vs flaxdet (jit), stage by stage")
    _, rep = run_parity(cfg, ckpt, image, "reference", out / "parity", (max(img.shape[:2]), min(img.shape[:2])))

    print("\n[demo] 3/6 synthetic COCO-format data (shapes; polygon and RLE masks)")
    size = (SCALE[1], SCALE[0])
    train_ann = make_synthetic_coco(out / "data" / "train", 64, seed=0, min_size=size, max_size=size)
    val_ann = make_synthetic_coco(out / "data" / "val", 16, seed=1, min_size=size, max_size=size)
    print(f"train {train_ann}, val {val_ann}")

    print(f"\n[demo] 4/6 mAP before fine-tuning (the checkpoint's class layers re-initialised for the "
          f"{len(CLASSES)} shape classes)")
    base, _, _ = load_model_dir(model_dir)
    base = adapt_num_classes(base, CLASSES)
    before = evaluate(base, val_ann, scale=SCALE, progress=False)

    tc = dict(leg.train, warmup_iters=leg.warmup(steps))
    what = ", ".join(f"{k} {v}" for k, v in tc.items())
    print(f"\n[demo] 5/6 fine-tune {steps} steps in JAX ({what})")
    if (out / "run").exists():  # the demo fine-tunes the checkpoint it just converted, every time (a kept
        shutil.rmtree(out / "run")  # run would be resumed: a finished one trains nothing and logs no loss)
        print(f"(removed the previous demo run in {out / 'run'})")
    t_train = time.time()
    tuned, hist = train(TrainConfig(model_dir, train_ann, out / "run", steps=steps, scale=SCALE,
                                    ckpt_every=max(steps // 3, 1), max_gt=8, **tc))
    t_train = time.time() - t_train
    after = evaluate(tuned, val_ann, scale=SCALE, progress=False, out_json=out / "val_results.json")
    ref_after = _reference_map(tuned, val_ann)

    print("\n[demo] 6/6 overlay and export")
    run_infer(out / "run" / "model", sorted((out / "data" / "val" / "images").glob("*.png"))[:2], out / "infer",
              scale=SCALE, score_thr=0.3, progress=False)
    back, n = export_model_dir(out / "run" / "model", out / "fine_tuned_visdet.pth")
    a = load_checkpoint(back)
    print(f"{back}: {n} keys, classes {a.classes}")

    def maps(m):
        return dict(bbox=m["bbox_mAP"], segm=m.get("segm_mAP"))

    same = maps(after) == maps(ref_after)
    summary = dict(family=leg.title, parity_passed=rep["passed"], loss_first=hist[0]["loss"] if hist else None,
                   loss_last=hist[-1]["loss"] if hist else None, steps=steps, train=tc,
                   map_before=maps(before), map_after=maps(after), reference_map_after=maps(ref_after),
                   reference_equal=same, train_seconds=round(t_train, 1), seconds=round(time.time() - t0, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n[demo] summary ({leg.title})")
    print(f"  parity table: {'PASS' if rep['passed'] else 'FAIL'} ({out / 'parity' / 'parity.png'})")
    if hist:
        print(f"  loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f} over {steps} steps "
              f"({out / 'run' / 'loss_curve.png'}; {t_train:.0f} s with compilation)")
    print(f"  val bbox mAP {_f(before['bbox_mAP'])} -> {_f(after['bbox_mAP'])}   segm mAP "
          f"{_f(before.get('segm_mAP'))} -> {_f(after.get('segm_mAP'))}   (flaxdet)")
    print(f"  reference/ on the fine-tuned weights: bbox {_f(ref_after['bbox_mAP'])}, "
          f"segm {_f(ref_after.get('segm_mAP'))}   ({'equal to' if same else 'DIFFERS from'} flaxdet's)")
    print(f"  overlays: {out / 'infer' / 'overlays'}   total {summary['seconds']} s   ({out / 'summary.json'})")
    return 0 if rep["passed"] and same else 1


def _reference_map(model, ann, scale=SCALE):
    """COCO mAP of reference/ (PyTorch) on ``model``'s config and weights -- a Mask R-CNN or an RTMDet(-Ins)."""
    from flaxdet.evaluation import evaluate
    from flaxdet.tools import reference_twin

    return evaluate(reference_twin(model), ann, scale=scale, backend="reference", progress=False)


if __name__ == "__main__":
    sys.exit(main())
