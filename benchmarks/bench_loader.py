"""Training input pipeline benchmark: flaxdet's grain pipeline vs ``torch.utils.data.DataLoader`` running the same
transforms with the same worker count.

    .venv/bin/python benchmarks/bench_loader.py [--num-images 64] [--size 480x640 640x853] [--scale 1333 800]
        [--batch 4] [--batches 60] [--workers 1 N] [--no-masks] [--out F] [--quick]

Data: a seeded synthetic COCO set (``flaxdet.data.synthetic``: JPEG-free PNGs of coloured shapes with polygon and
RLE masks, 1-6 objects an image) of images between the two ``--size`` bounds (H x W), written once to a temporary
folder. Work per batch, identical on both sides: visdet's train pipeline as flaxdet runs it -- OpenCV decode,
keep-ratio resize to ``--scale`` with GT boxes and masks (masks decoded from polygons/RLE; ``--no-masks``: boxes
only, as Faster R-CNN / RTMDet), random flip, fit into the step's shape bucket, image and GT padding
(:class:`flaxdet.data.grain_pipeline.PadToBucket`), then, in the consuming process, the padded GT mask block
(:func:`~flaxdet.data.grain_pipeline.expand_masks`).

- **grain**: :class:`flaxdet.data.grain_pipeline.GrainTrainLoader` as ``flaxdet train`` runs it (``mp_prefetch``
  worker processes, whole batches per worker, results in shared memory).
- **torch**: a ``torch.utils.data.Dataset`` whose item ``step`` is the same batch
  (:meth:`GrainTrainLoader.batch_in_worker`), ``DataLoader(batch_size=None, num_workers=W, prefetch_factor=2)``
  with workers spawned as grain's (its default collate turns the arrays into tensors and moves them through shared
  memory), the same ``expand_masks`` in the consumer.
- **in-process**: the same batches made one after another in this process (no worker): the transforms' own cost.

Both worker pools run one OpenCV thread per worker. Reported: images/s over ``--batches`` batches after the first
(worker start-up and the first batch excluded), per side and worker count, and ``per_worker`` = images/s / W. The
workers fill their prefetch buffers while the first batch is awaited, so short runs flatter the side with the deeper
buffer: time many batches (the default 60) on an idle machine.
JSON: ``benchmarks/results/loader.json``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import common


def _sizes(text):
    h, w = text.lower().split("x")
    return int(h), int(w)


def _cv2_one_thread(*_):
    import cv2

    cv2.setNumThreads(1)


class _TorchBatches:
    """``torch.utils.data.Dataset``: item ``step`` = the grain pipeline's worker output for that step."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __getitem__(self, step):
        return self.loader.batch_in_worker(step)


def run_grain(loader, workers, batches):
    loader.workers = workers
    it = loader.iterator(0)
    try:
        t0 = time.perf_counter()
        next(it)
        t1 = time.perf_counter()
        for _ in range(batches):
            next(it)  # (step, batch with gt_masks expanded, ...)
        t2 = time.perf_counter()
    finally:
        it.close()
    return dict(images_per_s=batches * loader.batch_size / (t2 - t1), startup_s=t1 - t0)


def run_torch(loader, workers, batches):
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from flaxdet.data.grain_pipeline import expand_masks

    def consume(b):
        b = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        if "gt_masks_list" in b:
            b["gt_masks_list"] = [np.asarray(m) for m in b["gt_masks_list"]]
        return expand_masks(b, loader.max_gt)

    # spawn, as grain's workers: forking this process (threads of JAX, grain, OpenCV running) can deadlock a worker
    dl = DataLoader(_TorchBatches(loader, batches + 1), batch_size=None, num_workers=workers,
                    worker_init_fn=_cv2_one_thread if workers else None, prefetch_factor=2 if workers else None,
                    multiprocessing_context="spawn" if workers else None)
    it = iter(dl)
    t0 = time.perf_counter()
    consume(next(it))
    t1 = time.perf_counter()
    for _ in range(batches):
        consume(next(it))
    t2 = time.perf_counter()
    del it
    return dict(images_per_s=batches * loader.batch_size / (t2 - t1), startup_s=t1 - t0)


def run_inprocess(loader, batches):
    t0 = time.perf_counter()
    for s in range(batches):
        loader.batch(s)
    return dict(images_per_s=batches * loader.batch_size / (time.perf_counter() - t0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--size", nargs=2, type=_sizes, default=[(480, 640), (640, 853)], metavar="HxW")
    ap.add_argument("--scale", nargs=2, type=int, default=[1333, 800])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per run (after the first)")
    ap.add_argument("--workers", nargs="+", type=int, default=None,
                    help="worker counts (default: 1 and all usable cores)")
    ap.add_argument("--max-gt", type=int, default=100)
    ap.add_argument("--no-masks", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 small images, 10 batches of 2")
    ap.add_argument("--note", help="a remark stored with the figures (e.g. the machine was busy)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.num_images, args.size, args.batch, args.batches = 16, [(120, 160), (160, 214)], 2, 10
        args.scale = [333, 200]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or sorted({1, cores})

    from flaxdet.data.coco import CocoDataset
    from flaxdet.data.grain_pipeline import GrainTrainLoader
    from flaxdet.data.synthetic import make_synthetic_coco

    with tempfile.TemporaryDirectory() as tmp:
        (lo_h, lo_w), (hi_h, hi_w) = args.size
        ann = make_synthetic_coco(Path(tmp) / "data", num_images=args.num_images, seed=0, min_size=(lo_h, lo_w),
                                  max_size=(hi_h, hi_w))
        ds = CocoDataset(ann)
        loader = GrainTrainLoader(ds, args.batch, tuple(args.scale), args.max_gt, seed=0,
                                  with_masks=not args.no_masks, num_steps=args.batches + 1)
        results = dict(inprocess=run_inprocess(loader, args.batches + 1), grain={}, torch={})
        print(f"in-process: {results['inprocess']['images_per_s']:.1f} img/s", flush=True)
        for w in workers:
            for side, fn in (("grain", run_grain), ("torch", run_torch)):
                r = fn(loader, w, args.batches)
                r["per_worker"] = r["images_per_s"] / w
                results[side][str(w)] = r
                print(f"{side:>6} workers={w}: {r['images_per_s']:.1f} img/s ({r['per_worker']:.1f} per worker, "
                      f"start-up {r['startup_s']:.1f} s)", flush=True)
    payload = dict(benchmark="loader", machine=common.machine(),
                   config=dict(num_images=args.num_images, size=[list(s) for s in args.size], scale=args.scale,
                               batch=args.batch, batches=args.batches, max_gt=args.max_gt, masks=not args.no_masks,
                               workers=workers, quick=args.quick),
                   results=results, note=args.note)
    print(f"wrote {common.save('loader.json', payload, args.out)}")


if __name__ == "__main__":
    main()
