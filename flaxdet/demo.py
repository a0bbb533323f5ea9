"""`make demo`: the user story on a small Mask R-CNN, start to finish, on CPU.

1. a visdet checkpoint: the recorded visdet test case in ../shared/goldens (`mask_rcnn_tiny_r18`,
   a runner-style checkpoint.pth) when present, otherwise one written here by reference/ from a
   seeded model (so the demo needs nothing outside the repo);
2. `flaxdet convert` it to a flaxdet model directory;
3. `flaxdet parity` on a photo: the per-stage table (PyTorch reference vs flaxdet under jit);
4. `flaxdet infer`: COCO-format JSON and an overlay PNG;
5. `flaxdet export` back to a visdet checkpoint, checked bit-identical.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "goldens" / "mask_rcnn_tiny_r18"


def _inputs(out: Path):
    """(checkpoint, config, image path, scale) for the demo."""
    if (GOLDEN / "checkpoint.pth").is_file():
        with np.load(GOLDEN / "color.npz") as z:
            img = z["input_bgr_uint8"]
        ckpt, cfg = GOLDEN / "checkpoint.pth", GOLDEN / "config.yaml"
        print(f"[demo] visdet checkpoint: {ckpt} (recorded visdet case)")
    else:
        import torch

        from flaxdet.config import dump_yaml, load_config
        from flaxdet_converters.checkpoint_io import save_checkpoint
        from flaxdet_reference import build_detector

        cfg_obj = load_config("mask_rcnn_r50")
        torch.manual_seed(0)
        ref = build_detector(cfg_obj)
        ckpt, cfg = out / "seeded_mask_rcnn_r50.pth", out / "mask_rcnn_r50.yaml"
        cfg.write_text(dump_yaml(cfg_obj))
        save_checkpoint(ckpt, {k: v.numpy() for k, v in ref.state_dict().items()},
                        classes=[f"class{i}" for i in range(80)])
        rng = np.random.default_rng(0)
        img = cv2.GaussianBlur(rng.integers(0, 255, (288, 512, 3), dtype=np.uint8), (0, 0), 6)
        print(f"[demo] no goldens found; wrote a seeded visdet checkpoint {ckpt}")
    image = out / "demo.png"
    cv2.imwrite(str(image), img)
    return ckpt, cfg, image, (max(img.shape[:2]), min(img.shape[:2]))


def main():
    from flaxdet.tools import convert_checkpoint, export_model_dir, run_infer, run_parity
    from flaxdet_converters.checkpoint_io import load_checkpoint

    out = ROOT / "out" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    ckpt, cfg, image, scale = _inputs(out)

    print("\n[demo] 1/4 convert")
    model_dir, report = convert_checkpoint(ckpt, cfg, out / "model", overwrite=True)
    print(report.summary(), f"-> {model_dir}")

    print("\n[demo] 2/4 parity: PyTorch reference vs flaxdet (jit), stage by stage")
    _, rep = run_parity(cfg, ckpt, image, "reference", out / "parity", scale)

    print("\n[demo] 3/4 infer")
    run_infer(model_dir, [image], out / "infer", scale=scale, score_thr=0.5)

    print("\n[demo] 4/4 export back to visdet")
    back, n = export_model_dir(model_dir, out / "exported.pth")
    a, b = load_checkpoint(ckpt).state_dict, load_checkpoint(back).state_dict
    same = list(a) == list(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    print(f"{back}: {n} keys, bit-identical to the input checkpoint: {same}")

    print(f"\n[demo] overlay: {out / 'infer' / 'overlays' / 'demo.png'}; parity plot: {out / 'parity' / 'parity.png'}")
    return 0 if rep["passed"] and same else 1


if __name__ == "__main__":
    sys.exit(main())
