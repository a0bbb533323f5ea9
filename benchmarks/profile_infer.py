"""Where the inference time goes: stage-by-stage latency of flaxdet (each stage its own jit) and of the
PyTorch reference on the same weights and image.

    .venv/bin/python benchmarks/profile_infer.py [--size 800x1333] [--batch 1] [--scenario max-dets]
        [--repeats 3] [--dtype float32] [--side both|flaxdet|pytorch] [--trace DIR]

Stages: preprocess + backbone, FPN neck, RPN head convolutions, RPN proposals (top-k, decode, NMS),
RoI box branch (RoIAlign, bbox head, per-class NMS), mask branch (RoIAlign, mask head, pasting) -- also
split into its parts (mask RoIAlign, mask head convolutions, paste), each on the detections' row
bucket -- and the host's share of ``Detector.detect`` (device_get + removing the padding). The PyTorch
side times its RoI head (box + mask) as one stage, and its mask branch (``predict_mask``) alone.
``--batch B``: B different synthetic images of the size. Stage jits see their inputs as
arguments, so XLA cannot fuse across stage boundaries: the sum is a little above the one-jit latency
of bench_infer.py. ``--trace DIR`` also writes a jax.profiler trace of the full one-jit predict
(open with TensorBoard / xprof) -- the per-HLO-op view.
Prints a table and writes benchmarks/results/profile_infer.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common


def flaxdet_stages(ckpt, preset, imgs, metas, dtype, repeats, trace=None):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flaxdet.config import load_config
    from flaxdet.fast_paths.mask_rows import mask_rows_for_count, pad_rows
    from flaxdet.inference import Detector, make_batch, unpad
    from flaxdet.models import build_detector
    from flaxdet.models.roi_heads.standard_roi_head import bbox2roi
    from flaxdet_converters.checkpoint_io import load_checkpoint
    from flaxdet_converters.convert import load_visdet_state_dict

    model = build_detector(load_config(preset))
    load_visdet_state_dict(model, load_checkpoint(ckpt).state_dict)
    det = Detector(model, dtype=dtype)
    gd, st = det.graphdef, det.state
    b = make_batch(imgs, metas)
    images, shapes, sfs = jnp.asarray(b.images), jnp.asarray(b.img_shapes), jnp.asarray(b.scale_factors)
    m = lambda s: nnx.merge(gd, s)  # noqa: E731
    rh = model.roi_head
    thr = rh.cfg.test_cfg.mask_thr_binary
    fns = {
        "preprocess+backbone": (jax.jit(lambda s, x, hw: m(s).backbone(m(s).data_preprocessor(x, hw))),
                                ("images", "shapes")),
        "neck (FPN)": (jax.jit(lambda s, f: m(s).neck(f)), ("feats",)),
        "RPN head convs": (jax.jit(lambda s, n: m(s).rpn_head(n)), ("neck",)),
        "RPN proposals (top-k, decode, NMS)": (jax.jit(lambda s, cr, hw: m(s).rpn_head.predict_by_feat(*cr, hw)),
                                               ("rpn", "shapes")),
        "RoI box branch (RoIAlign, head, NMS)": (jax.jit(lambda s, n, p, hw, sf: m(s).roi_head.predict_bbox(
            n, p[0], p[2], hw, sf, True)[0]), ("neck", "props", "shapes", "sfs")),
        "mask branch (RoIAlign, head, paste)": (jax.jit(lambda s, n, d, sf: m(s).roi_head.predict_mask(
            n, d, sf, b.canvas_hw, True)[0]), ("neck", "dets", "sfs")),
    }
    env = dict(images=images, shapes=shapes, sfs=sfs)
    keys = ["feats", "neck", "rpn", "props", "dets", None]
    rows = []

    def stage(name, fn, ins, key=None):
        args = [env[k] for k in ins]
        t = time.perf_counter()
        fn.lower(st, *args).compile()
        compile_s = time.perf_counter() - t
        first, times, r = common.timed(lambda fn=fn, args=args: fn(st, *args), repeats, jax.block_until_ready)
        if key:
            env[key] = r
        rows.append(dict(stage=name, **common.summarize(times), compile_s=compile_s))

    for i, (name, (fn, ins)) in enumerate(fns.items()):
        stage(name, fn, ins, keys[i])
    # the mask branch in parts, on the row bucket Detector uses (what predict_mask runs with rows=k)
    n, d = env["dets"]["valid"].shape
    k = mask_rows_for_count(d, int(env["dets"]["valid"].sum(1).max()))
    if k and rh.with_mask and not hasattr(rh, "num_stages"):
        stage(f"  mask RoIAlign ({n} x {d} rows)", jax.jit(lambda s, nk, dt: m(s).roi_head.mask_roi_extractor(
            nk, bbox2roi(dt["bboxes"]), valid=dt["valid"].reshape(-1))), ("neck", "dets"), "mroi")
        stage(f"  mask head convs ({n} x {k} rows)", jax.jit(lambda s, f: m(s).roi_head.mask_head(
            f.reshape(n, d, *f.shape[1:])[:, :k].reshape(n * k, *f.shape[1:]))), ("mroi",), "mlogits")

        def paste(s, lg, dt, sf):
            head = m(s).roi_head.mask_head
            fn = lambda g, bx, lab, f: head.predict_single(g, bx, lab, f, b.canvas_hw, thr, True)  # noqa: E731
            masks, _ = jax.vmap(fn)(lg.reshape(n, k, *lg.shape[1:]), dt["bboxes"][:, :k], dt["labels"][:, :k], sf)
            return pad_rows(masks, n, d) & dt["valid"][:, :, None, None]

        stage(f"  mask paste ({n} x {k} on {b.canvas_hw[0]}x{b.canvas_hw[1]})", jax.jit(paste),
              ("mlogits", "dets", "sfs"))
    full = lambda: det.predict_batch(b)  # noqa: E731
    _, times, r = common.timed(full, repeats, jax.block_until_ready)
    rows.append(dict(stage="one-jit predict (bench_infer)", **common.summarize(times)))
    _, times, _ = common.timed(lambda: unpad(jax.device_get(r), b), repeats)
    rows.append(dict(stage="host: device_get + unpad (Detector.detect)", **common.summarize(times)))
    if trace:
        jax.profiler.start_trace(trace)
        jax.block_until_ready(full())
        jax.profiler.stop_trace()
    return rows, int(jnp.asarray(r["valid"]).sum())


def pytorch_stages(ckpt, preset, imgs, metas, repeats):
    import torch

    from flaxdet.config import load_config
    from flaxdet_converters.checkpoint_io import load_checkpoint
    from flaxdet_reference import build_detector
    from flaxdet_reference.models import load_state_dict_strict

    dev = common.torch_setup()
    m = build_detector(load_config(preset))
    load_state_dict_strict(m, load_checkpoint(ckpt).state_dict)
    m.eval().to(dev)
    x = [torch.from_numpy(img).permute(2, 0, 1).contiguous().to(dev) for img in imgs]
    env = {}

    def sync(r):
        common.torch_sync()
        return r

    def pre_backbone():
        batch, shape = m.data_preprocessor(x)
        env["metas"] = [dict(meta, batch_input_shape=shape) for meta in metas]
        return m.backbone(batch)

    stages = [("preprocess+backbone", pre_backbone, "feats"),
              ("neck (FPN)", lambda: m.neck(env["feats"]), "neck"),
              ("RPN head convs", lambda: m.rpn_head(env["neck"]), "rpn"),
              ("RPN proposals (top-k, decode, NMS)", lambda: m.rpn_head.predict_by_feat(
                  *env["rpn"], env["metas"], m.rpn_head.cfg.test_cfg), "props"),
              ("RoI heads (box + mask)", lambda: m.roi_head.predict(env["neck"], env["props"], env["metas"]), "dets")]
    if getattr(m.roi_head, "with_mask", False) and hasattr(m.roi_head, "predict_mask"):
        stages.append(("  mask branch (RoIAlign, head, paste)", lambda: m.roi_head.predict_mask(
            env["neck"], env["metas"], [dict(r) for r in env["dets"]], True), None))
    rows = []
    with torch.no_grad():
        for name, fn, key in stages:
            _, times, r = common.timed(fn, repeats, sync)
            if key:
                env[key] = r
            rows.append(dict(stage=name, **common.summarize(times)))
        _, times, r = common.timed(lambda: m.predict(x, metas), repeats, sync)
    rows.append(dict(stage="whole predict (bench_infer)", **common.summarize(times)))
    return rows, int(len(r[0]["scores"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mask_rcnn_r50")
    p.add_argument("--size", default="800x1333")
    p.add_argument("--batch", type=int, default=1, help="images per batch (different synthetic images)")
    p.add_argument("--scenario", default="max-dets", choices=common.SCENARIOS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--side", default="both", choices=["both", "flaxdet", "pytorch"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trace", help="also write a jax.profiler trace of the one-jit predict here")
    p.add_argument("--out", help="JSON path (default benchmarks/results/profile_infer.json)")
    a = p.parse_args(argv)
    h, w = (int(v) for v in a.size.split("x"))
    imgs = [common.synthetic_image(h, w, seed=i) for i in range(a.batch)]
    metas = [dict(ori_shape=(h, w), img_shape=(h, w), scale_factor=(1.0, 1.0, 1.0, 1.0))] * a.batch
    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_prof_"))
    ckpt = common.write_checkpoint(tmp / "w.pth",
                                   common.scenario_weights(common.seeded_state_dict(a.preset), a.scenario))
    res = dict(benchmark="profile_infer", machine=common.machine(), preset=a.preset, size=a.size,
               batch=a.batch, scenario=a.scenario, dtype=a.dtype, repeats=a.repeats)
    if a.side in ("both", "pytorch"):
        res["pytorch"], res["pytorch_dets"] = pytorch_stages(ckpt, a.preset, imgs, metas, a.repeats)
        print(common.table(res["pytorch"], [("PyTorch stage", "stage", ""), ("median s", "median_s", ".3f")]), "\n")
    if a.side in ("both", "flaxdet"):
        res["flaxdet"], res["flaxdet_dets"] = flaxdet_stages(ckpt, a.preset, imgs, metas, a.dtype, a.repeats,
                                                            a.trace)
        print(common.table(res["flaxdet"], [(f"flaxdet {a.dtype} stage", "stage", ""), ("median s", "median_s", ".3f"),
                                            ("compile s", "compile_s", ".1f")]))
    out = common.save("profile_infer.json", res, a.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
