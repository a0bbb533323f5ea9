"""Inference benchmark: reference PyTorch eager (visdet's numerics) vs flaxdet jit, same weights, same images.

    .venv/bin/python benchmarks/bench_infer.py [--preset mask_rcnn_r50] [--sizes 800x1333 480x640]
        [--batches 1 4] [--scenarios no-dets max-dets] [--dtypes float32 bfloat16] [--repeats 3] [--out F]

Model: a preset (default ``mask_rcnn_r50``, Mask R-CNN R50-FPN; ``--preset mask_rcnn_swin_s`` for visdet's
Swin-S flagship) with seeded weights saved as a visdet checkpoint by reference/ and loaded on each side
(flaxdet: by the production converter). Two scenarios, because the mask branch runs only on the
detections there are: ``no-dets`` (the seeded weights: every score under ``score_thr``, so no detection
and no mask head on either side) and ``max-dets`` (the classifier bias of 10 classes raised by 3: every
proposal clears ``score_thr`` and both sides return ``max_per_img`` = 100 detections per image with masks
-- what a trained model does on a busy image). Batch B = B different synthetic images of the same size.

Each (side, dtype) runs in its own subprocess so peak resident memory is its own. flaxdet's one-time
cost per shape bucket is measured ahead-of-time: ``trace_s`` (tracing + lowering to StableHLO) and
``compile_s`` (XLA compile); the timed calls then hit the jit cache. Reported per row: median / min
latency per batch over ``repeats`` runs after one warm-up, peak RSS, detections per image, and the
ratio pytorch / flaxdet median (> 1: flaxdet faster). Timings include preprocessing, RPN, RoI heads,
NMS and mask pasting (not image decoding). ``--dtypes bfloat16`` runs flaxdet's mixed-precision
policy (convolutions and matmuls in bf16 with float32 accumulation; flaxdet.nn.set_compute_dtype);
the PyTorch side is always float32 (visdet's numerics).

Runs unchanged on a GPU: torch uses cuda when available, JAX its default backend.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import common


def worker(spec):
    import numpy as np

    if spec["side"] == "peak":
        import jax

        common.emit(dict(spec, matmul_peak_gflops=common.matmul_peaks(), device=str(jax.devices()[0])))
        return

    from flaxdet.config import load_config

    cfg = load_config(spec["preset"])
    h, w = (int(v) for v in spec["size"].split("x"))
    imgs = [common.synthetic_image(h, w, seed=i) for i in range(spec["batch"])]
    metas = [dict(ori_shape=(h, w), img_shape=(h, w), scale_factor=(1.0, 1.0, 1.0, 1.0))] * spec["batch"]
    out = dict(spec)
    if spec["side"] == "pytorch":
        import torch

        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_reference import build_detector
        from flaxdet_reference.models import load_state_dict_strict

        dev = common.torch_setup()
        m = build_detector(cfg)
        load_state_dict_strict(m, load_checkpoint(spec["ckpt"]).state_dict)
        m.eval().to(dev)
        xs = [torch.from_numpy(im).permute(2, 0, 1).contiguous().to(dev) for im in imgs]

        def run():
            with torch.no_grad():
                return m.predict(xs, metas)

        def sync(r):
            common.torch_sync()
            return r

        n_det = lambda rs: [int(len(r["scores"])) for r in rs]  # noqa: E731
        out.update(device=str(dev), dtype="float32")
    else:
        import jax

        from flaxdet.inference import Detector, make_batch
        from flaxdet.models import build_detector
        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_converters.convert import load_visdet_state_dict

        model = build_detector(cfg)
        load_visdet_state_dict(model, load_checkpoint(spec["ckpt"]).state_dict)
        det = Detector(model, dtype=spec["dtype"])
        batch = make_batch(imgs, metas)
        # fills the jit caches: predict_batch below does not compile again (mask models: the box jit
        # and the mask jit of this scenario's row bucket)
        out.update(det.compile(batch), device=str(jax.devices()[0]), padded_shape=list(batch.images.shape))
        run = lambda: det.predict_batch(batch)  # noqa: E731
        sync = jax.block_until_ready
        n_det = lambda r: [int(v) for v in np.asarray(r["valid"]).sum(1)]  # noqa: E731
    first, times, r = common.timed(run, spec["repeats"], sync)
    out.update(common.summarize(times), first_call_s=first, peak_rss_mb=common.peak_rss_mb(),
               device_peak_mb=common.device_peak_mb(spec["side"]), detections=n_det(r))
    if spec["side"] == "flaxdet":  # achieved GFLOP/s: XLA's operation count over the median latency
        from flaxdet.fast_paths.mask_rows import mask_rows_for_count

        valid = np.asarray(r["valid"])
        rows = mask_rows_for_count(valid.shape[1], int(valid.sum(1).max())) if valid.any() else None
        out["gflop"] = common.detector_gflop(det, batch, rows)
        out["gflops"] = out["gflop"] / out["median_s"]
    out.pop("ckpt")
    common.emit(out)


COLS = [("preset", "preset", ""), ("scenario", "scenario", ""), ("size", "size", ""), ("batch", "batch", "d"),
        ("dets/img", lambda r: r["flaxdet"][r["dtypes"][0]]["detections"][0], "d"),
        ("pytorch s", lambda r: r["pytorch"]["median_s"], ".2f")]


def columns(dtypes):
    return common.dtype_columns(COLS, dtypes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mask_rcnn_r50", help="model preset (e.g. mask_rcnn_swin_s)")
    p.add_argument("--sizes", nargs="+", default=["800x1333", "480x640"], help="HxW of the network input")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--scenarios", nargs="+", default=list(common.SCENARIOS), choices=common.SCENARIOS)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="flaxdet compute dtypes (the PyTorch side is float32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median reported)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/infer[_PRESET].json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))

    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_bench_"))
    sd = common.seeded_state_dict(a.preset)
    ckpts = {s: str(common.write_checkpoint(tmp / f"{a.preset}_{s}.pth", common.scenario_weights(sd, s)))
             for s in a.scenarios}
    machine = common.machine()
    peaks = common.run_worker(__file__, dict(side="peak"))["matmul_peak_gflops"]
    print(f"XLA:CPU matmul peak (2048^3): float32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f}",
          flush=True)
    rows = []
    for scenario in a.scenarios:
        for size in a.sizes:
            for b in a.batches:
                base = dict(ckpt=ckpts[scenario], preset=a.preset, size=size, batch=b, repeats=a.repeats,
                            scenario=scenario)
                pt, fd, ratio = common.run_sides(__file__, base, a.dtypes)
                rows.append(dict(preset=a.preset, scenario=scenario, size=size, batch=b, dtypes=a.dtypes,
                                 pytorch=pt, flaxdet=fd, ratio=ratio))
    out = common.save(f"infer{'' if a.preset == 'mask_rcnn_r50' else '_' + a.preset}.json",
                      dict(benchmark="infer", machine=machine, preset=a.preset, matmul_peak_gflops=peaks,
                           weights="seeded (reference/, torch seed 0)", repeats=a.repeats, results=rows), a.out)
    print()
    print(common.table(rows, columns(a.dtypes)))
    print("latency per batch (median); ratio = pytorch / flaxdet (> 1: flaxdet faster); compile = trace + XLA "
          "compile per shape bucket")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
