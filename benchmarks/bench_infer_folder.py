"""Throughput on a folder of photos: flaxdet's pipelined inference vs a PyTorch loop over the same files.

    .venv/bin/python benchmarks/bench_infer_folder.py [--preset mask_rcnn_r50] [--n 64] [--batch 4]
        [--scenarios no-dets max-dets] [--modes pipelined sequential one-by-one] [--scale 1333 800]
        [--workers 2] [--out F]

The folder: ``--n`` JPEG photos made in a temporary directory from the real photos recorded in the goldens
($FLAXDET_GOLDENS or ../shared/goldens: the 3 images of mask_rcnn_tiny_r18 and the 2 other sizes of
rtmdet_ins_tiny), each resized to one of 8 sizes from 375x500 to 720x1280 (landscape, portrait, square; drawn
with a fixed seed), so at the test scale they fall into 5 shape buckets. Model: ``--preset`` with seeded weights
(the ``scenario`` of bench_infer.py: ``no-dets`` returns nothing, ``max-dets`` 100 detections with masks per
image), written as a visdet checkpoint and loaded by each side.

Sides, each in its own process, each timing one pass over the folder, images in, detections with masks at
the original size (numpy) out; decoding and resizing included, writing results not:

- ``pytorch``: reference/ (visdet's numerics) in a loop, one image at a time as visdet's test loop:
  ``cv2.imread``, keep-ratio resize, ``predict``; after a 2-image warm-up.
- flaxdet ``pipelined``: ``Detector.stream(folder, batch_size=--batch, workers=--workers)`` (decode/resize in
  threads, batches by shape bucket, the model thread overlapping the consumer);
- flaxdet ``sequential``: the same batches (``plan_batches``) without the pipeline: decode, resize, ``detect``,
  one batch after the other;
- flaxdet ``one-by-one``: ``Detector.__call__`` on each file (batch 1, no pipeline).

Each flaxdet mode first runs one untimed pass (compiling every shape bucket and batch size it meets: reported as
``first_pass_s``), then the timed pass. Reported: images/s and ratio = flaxdet images/s / PyTorch images/s (> 1:
flaxdet faster), the batches formed and peak RSS. Writes benchmarks/results/infer_folder.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import common

SIZES = [(480, 640), (427, 640), (640, 480), (600, 800), (768, 1024), (375, 500), (512, 512), (720, 1280)]
PHOTOS = ("mask_rcnn_tiny_r18/coco_test_12510.npz", "mask_rcnn_tiny_r18/voc_000001.npz",
          "mask_rcnn_tiny_r18/color.npz", "rtmdet/rtmdet_ins_tiny/voc_000001.npz")


def make_folder(d, n, seed=0):
    """``n`` JPEGs in ``d``: the goldens' photos at the sizes of :data:`SIZES` (seeded draw; synthetic images when
    the goldens are missing). Returns (paths, source description)."""
    import cv2
    import numpy as np

    root = Path(os.environ.get("FLAXDET_GOLDENS") or common.REPO.parent / "shared" / "goldens")
    photos = [np.load(root / p)["input_bgr_uint8"] for p in PHOTOS if (root / p).is_file()]
    source = f"goldens' photos ({len(photos)})" if photos else "synthetic (no goldens found)"
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = SIZES[int(rng.integers(len(SIZES)))]
        img = (cv2.resize(photos[i % len(photos)], (w, h), interpolation=cv2.INTER_AREA) if photos
               else common.synthetic_image(h, w, seed=i))
        if i % 2:
            img = img[:, ::-1]
        p = d / f"{i:03d}.jpg"
        cv2.imwrite(str(p), np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(p)
    return paths, source


def worker(spec):
    import numpy as np

    from flaxdet.config import load_config
    from flaxdet.data.transforms import load_image, resize_keep_ratio

    cfg = load_config(spec["preset"])
    paths = sorted(Path(spec["folder"]).glob("*.jpg"))
    scale = tuple(spec["scale"])
    out = dict(spec, images=len(paths))
    if spec["side"] == "pytorch":
        import torch

        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_reference import build_detector
        from flaxdet_reference.models import load_state_dict_strict

        dev = common.torch_setup()
        m = build_detector(cfg)
        load_state_dict_strict(m, load_checkpoint(spec["ckpt"]).state_dict)
        m.eval().to(dev)

        def one(p):
            img, meta = resize_keep_ratio(load_image(p), scale)
            with torch.no_grad():
                r = m.predict([torch.from_numpy(img).permute(2, 0, 1).contiguous().to(dev)], [meta])[0]
            common.torch_sync()
            return {k: v.cpu().numpy() for k, v in r.items()}

        for p in paths[:2]:
            one(p)
        t = time.perf_counter()
        dets = [len(one(p)["scores"]) for p in paths]
        out.update(seconds=time.perf_counter() - t, device=str(dev))
    else:
        import cv2
        import jax

        from flaxdet.data.transforms import rescale_size
        from flaxdet.inference import Detector, _round_up, plan_batches
        from flaxdet.models import build_detector
        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_converters.convert import load_visdet_state_dict

        model = build_detector(cfg)
        load_visdet_state_dict(model, load_checkpoint(spec["ckpt"]).state_dict)
        det = Detector(model)
        mode, b = spec["mode"], spec["batch"]
        div = cfg.data_preprocessor.pad_size_divisor
        keys = []
        for path in paths:  # the batches the pipeline forms (for the report and the sequential mode)
            h, w = cv2.imread(str(path)).shape[:2]
            nw, nh = rescale_size(w, h, scale)
            keys.append((_round_up(nh, div), _round_up(nw, div)))
        groups = plan_batches(keys, b if mode != "one-by-one" else 1)

        def run():
            if mode == "pipelined":
                return [len(r) for _, r in det.stream(spec["folder"], batch_size=b, scale=scale,
                                                       workers=spec["workers"])]
            if mode == "sequential":
                n = [0] * len(paths)
                for g in groups:
                    prep = [resize_keep_ratio(load_image(paths[i]), scale) for i in g]
                    for i, d in zip(g, det.detect([x[0] for x in prep], [x[1] for x in prep])):
                        n[i] = len(d["scores"])
                return n
            return [len(det(p, scale=scale)) for p in paths]

        t = time.perf_counter()
        run()
        out["first_pass_s"] = time.perf_counter() - t
        t = time.perf_counter()
        dets = run()
        out.update(seconds=time.perf_counter() - t, device=str(jax.devices()[0]),
                   batches=[len(g) for g in groups], buckets=len(set(keys)))
    out.update(images_per_s=len(paths) / out["seconds"], detections_per_image=float(np.mean(dets)),
               peak_rss_mb=common.peak_rss_mb())
    out.pop("ckpt")
    common.emit(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mask_rcnn_r50")
    p.add_argument("--n", type=int, default=64, help="photos in the folder")
    p.add_argument("--batch", type=int, default=4, help="flaxdet images per batch (pipelined, sequential)")
    p.add_argument("--workers", type=int, default=2, help="flaxdet decode/resize threads (pipelined)")
    p.add_argument("--scenarios", nargs="+", default=list(common.SCENARIOS), choices=common.SCENARIOS)
    p.add_argument("--modes", nargs="+", default=["pipelined", "sequential", "one-by-one"],
                   choices=["pipelined", "sequential", "one-by-one"])
    p.add_argument("--scale", nargs=2, type=int, default=[1333, 800], metavar=("LONG", "SHORT"),
                   help="keep-ratio test resize (both sides)")
    p.add_argument("--no-pytorch", action="store_true", help="flaxdet modes only (no ratios)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/infer_folder.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))

    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_folder_"))
    paths, source = make_folder(tmp / "photos", a.n)
    sd = common.seeded_state_dict(a.preset)
    machine = common.machine()
    rows = []
    for scenario in a.scenarios:
        ckpt = str(common.write_checkpoint(tmp / f"{scenario}.pth", common.scenario_weights(sd, scenario)))
        base = dict(ckpt=ckpt, preset=a.preset, folder=str(tmp / "photos"), scale=a.scale, batch=a.batch,
                    workers=a.workers, scenario=scenario)
        pt = None
        if not a.no_pytorch:
            pt = common.run_worker(__file__, dict(base, side="pytorch"))
            print(json.dumps(pt), flush=True)
        for mode in a.modes:
            fd = common.run_worker(__file__, dict(base, side="flaxdet", mode=mode))
            print(json.dumps(fd), flush=True)
            rows.append(dict(scenario=scenario, mode=mode, batch=a.batch if mode != "one-by-one" else 1,
                             flaxdet=fd, pytorch=pt, ratio=fd["images_per_s"] / pt["images_per_s"] if pt else None))
    out = common.save("infer_folder.json", dict(benchmark="infer_folder", machine=machine, preset=a.preset,
                                                photos=source, n=a.n, scale=a.scale, sizes=SIZES,
                                                weights="seeded (reference/, torch seed 0)", results=rows), a.out)
    cols = [("scenario", "scenario", ""), ("flaxdet mode", "mode", ""), ("batch", "batch", "d"),
            ("dets/img", lambda r: r["flaxdet"]["detections_per_image"], ".0f"),
            ("PyTorch img/s", lambda r: r["pytorch"]["images_per_s"] if r["pytorch"] else None, ".3f"),
            ("flaxdet img/s", lambda r: r["flaxdet"]["images_per_s"], ".3f"),
            ("ratio", "ratio", ".2f"), ("first pass s", lambda r: r["flaxdet"]["first_pass_s"], ".0f"),
            ("RSS MB pt/fd", lambda r: (f"{r['pytorch']['peak_rss_mb']:.0f}" if r["pytorch"] else "-")
             + f"/{r['flaxdet']['peak_rss_mb']:.0f}", "")]
    print()
    print(common.table(rows, cols))
    print(f"{a.n} photos ({source}); ratio = flaxdet images/s / PyTorch images/s (> 1: flaxdet faster); first pass "
          "= the untimed pass that compiles every shape bucket")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
