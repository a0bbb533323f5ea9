"""Inference benchmark: reference PyTorch eager (visdet's numerics) vs flaxdet jit, same weights, same image.

    .venv/bin/python benchmarks/bench_infer.py [--sizes 800x1333 480x640] [--scenarios no-dets max-dets]
                                               [--repeats 5] [--out bench.json]

Mask R-CNN R50-FPN (preset ``mask_rcnn_r50``; seeded weights saved as a visdet checkpoint by reference/,
converted by the production converter). Two scenarios, because the mask branch runs only on the
detections there are: ``no-dets`` (the seeded weights: every score under ``score_thr``, so no
detection and no mask head on either side) and ``max-dets`` (the same weights with the classifier
bias of 10 classes raised by 3, so every proposal clears ``score_thr`` and both sides return
``max_per_img`` = 100 detections with masks -- what a trained model does on a busy image). Each side runs in its own subprocess so peak resident memory
is its own. Reports, per input size: median / min latency over ``repeats`` runs after one warm-up,
flaxdet's first-call (compile) time, peak RSS, detections, and the ratio pytorch / flaxdet (> 1 means
flaxdet is faster). Timings include preprocessing, RPN, RoI heads, NMS and mask pasting (not decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _image(h, w):
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    for _ in range(12):  # some structure so the RPN has something to find
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(30, w // 3)), y + int(rng.integers(30, h // 3))), c, -1)
    return img


def worker(side, ckpt, h, w, repeats):
    import numpy as np

    from flaxdet.config import load_config

    cfg = load_config("mask_rcnn_r50")
    img = _image(h, w)
    meta = dict(ori_shape=(h, w), img_shape=(h, w), scale_factor=(1.0, 1.0, 1.0, 1.0))
    times, first = [], None
    if side == "pytorch":
        import torch

        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_reference import build_detector
        from flaxdet_reference.models import load_state_dict_strict

        torch.set_num_threads(os.cpu_count())
        m = build_detector(cfg)
        load_state_dict_strict(m, load_checkpoint(ckpt).state_dict)
        x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        run = lambda: m.predict([x], [meta])[0]  # noqa: E731
        n_det = lambda r: int(len(r["scores"]))  # noqa: E731
    else:
        import jax

        from flaxdet.inference import Detector, make_batch
        from flaxdet.models.detectors.two_stage import build_detector
        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_converters.convert import load_visdet_state_dict

        model = build_detector(cfg)
        load_visdet_state_dict(model, load_checkpoint(ckpt).state_dict)
        det = Detector(model)
        batch = make_batch([img], [meta])

        def run():
            return jax.block_until_ready(det.predict_batch(batch))

        n_det = lambda r: int(np.asarray(r["valid"]).sum())  # noqa: E731
    t = time.perf_counter()
    r = run()
    first = time.perf_counter() - t
    for _ in range(repeats):
        t = time.perf_counter()
        r = run()
        times.append(time.perf_counter() - t)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(side=side, size=f"{h}x{w}", median_s=statistics.median(times), min_s=min(times),
                          first_call_s=first, peak_rss_mb=peak_mb, detections=n_det(r), repeats=repeats)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["800x1333", "480x640"])
    p.add_argument("--scenarios", nargs="+", default=["no-dets", "max-dets"], choices=["no-dets", "max-dets"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/infer.json")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        side, ckpt, size, repeats = a.worker
        h, w = (int(v) for v in size.split("x"))
        worker(side, ckpt, h, w, int(repeats))
        return
    import torch

    from flaxdet.config import load_config
    from flaxdet_converters.checkpoint_io import save_checkpoint
    from flaxdet_reference import build_detector

    torch.manual_seed(0)
    ref = build_detector(load_config("mask_rcnn_r50"))
    tmp = Path(tempfile.mkdtemp())
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    ckpts = {}
    for scenario in a.scenarios:
        w = dict(sd)
        if scenario == "max-dets":
            b = w["roi_head.bbox_head.fc_cls.bias"].copy()
            b[:10] += 3.0
            w["roi_head.bbox_head.fc_cls.bias"] = b
        ckpts[scenario] = tmp / f"mask_rcnn_r50_{scenario}.pth"
        save_checkpoint(ckpts[scenario], w)
    rows = []
    for scenario in a.scenarios:
        for size in a.sizes:
            res = {}
            for side in ("pytorch", "flaxdet"):
                r = subprocess.run([sys.executable, __file__, "--worker", side, str(ckpts[scenario]), size,
                                    str(a.repeats)], capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(f"{side} {size} {scenario} failed:\n{r.stderr[-3000:]}")
                res[side] = json.loads(r.stdout.strip().splitlines()[-1])
                print(json.dumps(dict(res[side], scenario=scenario)), flush=True)
            rows.append(dict(scenario=scenario, size=size, pytorch=res["pytorch"], flaxdet=res["flaxdet"],
                             speedup_pytorch_over_flaxdet=res["pytorch"]["median_s"] / res["flaxdet"]["median_s"]))
    import jax

    out = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                            python=platform.python_version(), torch=torch.__version__, jax=jax.__version__,
                            jax_backend=jax.default_backend()), model="mask_rcnn_r50 (seeded weights)", batch=1,
               results=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\n{'scenario':<9} {'size':<10} {'dets':>5} {'pytorch s':>10} {'flaxdet s':>10} {'ratio':>7} {'compile s':>10}")
    for r in rows:
        print(f"{r['scenario']:<9} {r['size']:<10} {r['flaxdet']['detections']:>5} {r['pytorch']['median_s']:>10.2f} "
              f"{r['flaxdet']['median_s']:>10.2f} {r['speedup_pytorch_over_flaxdet']:>7.2f} "
              f"{r['flaxdet']['first_call_s']:>10.1f}")
    print("ratio = pytorch / flaxdet median latency (> 1: flaxdet faster)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
