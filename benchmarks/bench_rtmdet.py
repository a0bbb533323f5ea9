"""RTMDet / RTMDet-Ins inference benchmark: PyTorch eager (reference/, visdet's numerics), ONNX Runtime and
flaxdet jit, the same seeded weights, the same images.

    .venv/bin/python benchmarks/bench_rtmdet.py [--presets rtmdet_tiny rtmdet_s rtmdet_l rtmdet_ins_s]
        [--size 640x640] [--batches 1 8] [--repeats 3] [--threads 2] [--out F]

Two measurements per (preset, batch):
- ``network``: backbone + neck + head raw outputs on a preprocessed, padded batch -- what people deploying RTMDet
  on CPU export and time. PyTorch eager, ONNX Runtime (``torch.onnx.export`` of reference/'s network, CPU
  provider, ``--threads`` intra-op threads; needs ``pip install onnxruntime onnx``, the ``bench`` extra, else the
  column is skipped) and flaxdet (one jit of the same three modules, image by image at batch > 1 as its predict
  runs them on CPU: the ``image_loop`` fast path).
- ``e2e``: the whole predict (preprocessing, network, score filter + per-level top-k, decoding, class-wise NMS,
  Ins masks) on uint8 images: PyTorch reference/ vs flaxdet's Detector.
Weights are reference/'s torch-seeded init with 80 classes: logits near 0, so at the presets' score_thr (0.001,
Ins 0.05) nearly every (prior, class) pair passes and the NMS sees its worst case (``nms_pre`` per level) -- a
stress test of the post-processing, not a trained model's load. Each (side, measurement) runs in its own
subprocess (peak RSS its own); flaxdet's trace + compile per shape bucket is measured ahead of the timed calls.
ratio = PyTorch median / other median (> 1: the other faster).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import common

SIDES = ("pytorch", "onnxruntime", "flaxdet")


def _cfg(preset):
    from flaxdet.config import load_config, with_num_classes

    return with_num_classes(load_config(preset), num_classes=80, log=lambda *_: None)


def _inputs(spec):
    import numpy as np

    h, w = (int(v) for v in spec["size"].split("x"))
    imgs = [common.synthetic_image(h, w, seed=i) for i in range(spec["batch"])]
    metas = [dict(ori_shape=(h, w), img_shape=(h, w), scale_factor=(1.0, 1.0, 1.0, 1.0))] * spec["batch"]
    return imgs, metas, np.stack(imgs)


def worker(spec):
    import numpy as np

    cfg = _cfg(spec["preset"])
    imgs, metas, batch_u8 = _inputs(spec)
    out = dict(spec)
    if spec["side"] in ("pytorch", "onnxruntime"):
        import torch

        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_reference import build_detector
        from flaxdet_reference.models import load_state_dict_strict

        torch.set_num_threads(spec["threads"])
        m = build_detector(cfg)
        load_state_dict_strict(m, load_checkpoint(spec["ckpt"]).state_dict)
        m.eval()
        xs = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in imgs]
        pre, _ = m.data_preprocessor(xs)
        net = torch.nn.Sequential(m.backbone, m.neck, m.bbox_head).eval()
        if spec["side"] == "onnxruntime":
            import onnxruntime as ort

            path = Path(tempfile.mkdtemp(prefix="flaxdet_onnx_")) / "net.onnx"
            torch.onnx.export(net, (pre,), str(path), opset_version=17, dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = spec["threads"], 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: pre.numpy()}
            run = lambda: sess.run(None, feed)  # noqa: E731
        elif spec["mode"] == "network":
            run = lambda: net(pre)  # noqa: E731
        else:
            run = lambda: m.predict(xs, metas)  # noqa: E731
        with torch.no_grad():
            first, times, _ = common.timed(run, spec["repeats"])
    else:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from flaxdet.fast_paths.image_loop import per_image
        from flaxdet.inference import Detector, make_batch
        from flaxdet.models import build_detector
        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_converters.convert import load_visdet_state_dict

        model = build_detector(cfg)
        load_visdet_state_dict(model, load_checkpoint(spec["ckpt"]).state_dict)
        det = Detector(model)
        batch = make_batch(imgs, metas)
        if spec["mode"] == "network":
            graphdef, state = nnx.split(model)

            @jax.jit
            def net(state, images, shapes):  # as predict runs it: image by image on the image_loop fast path
                m = nnx.merge(graphdef, state)
                return per_image(lambda x, hw: m.bbox_head(m.extract_feat(m.data_preprocessor(x, hw))[1]),
                                 images, shapes)

            args = (state, jnp.asarray(batch.images), jnp.asarray(batch.img_shapes))
            import time

            t = time.perf_counter()
            lowered = net.lower(*args)
            t1 = time.perf_counter()
            lowered.compile()
            out.update(trace_s=t1 - t, compile_s=time.perf_counter() - t1)
            run = lambda: net(*args)  # noqa: E731
        else:
            out.update(det.compile(batch))
            run = lambda: det.predict_batch(batch)  # noqa: E731
        first, times, _ = common.timed(run, spec["repeats"], jax.block_until_ready)
        out.update(device=str(jax.devices()[0]))
    out.update(common.summarize(times), first_call_s=first, peak_rss_mb=common.peak_rss_mb(),
               input_shape=list(np.asarray(batch_u8).shape))
    out.pop("ckpt")
    common.emit(out)


def _has_onnxruntime():
    try:
        import onnxruntime  # noqa: F401

        return True
    except ImportError:
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["rtmdet_tiny", "rtmdet_s", "rtmdet_l", "rtmdet_ins_s"])
    p.add_argument("--size", default="640x640", help="HxW of the network input (a multiple of 32)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median reported)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="PyTorch / ONNX Runtime intra-op threads (XLA:CPU uses every core it is given)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/rtmdet.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))

    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_bench_"))
    ort = _has_onnxruntime()
    if not ort:
        print("onnxruntime is not installed: the ONNX Runtime column is skipped (pip install onnxruntime onnx)")
    rows = []
    for preset in a.presets:
        import torch

        from flaxdet_reference import build_detector

        torch.manual_seed(0)
        sd = {k: v.detach().numpy().copy() for k, v in build_detector(_cfg(preset)).state_dict().items()}
        ckpt = str(common.write_checkpoint(tmp / f"{preset}.pth", sd))
        for b in a.batches:
            base = dict(ckpt=ckpt, preset=preset, size=a.size, batch=b, repeats=a.repeats, threads=a.threads)
            row = dict(preset=preset, size=a.size, batch=b)
            for mode, sides in (("network", ("pytorch", "onnxruntime", "flaxdet") if ort else ("pytorch", "flaxdet")),
                                ("e2e", ("pytorch", "flaxdet"))):
                res = {s: common.run_worker(__file__, dict(base, side=s, mode=mode)) for s in sides}
                for r in res.values():
                    print(json.dumps(r), flush=True)
                row[mode] = res
            rows.append(row)
    out = common.save("rtmdet.json", dict(benchmark="rtmdet", machine=common.machine(), threads=a.threads,
                                          weights="seeded (reference/, torch seed 0), 80 classes",
                                          repeats=a.repeats, results=rows), a.out)
    print()
    print(common.table(rows, COLS))
    print("median latency per batch; ratio = pytorch / other (> 1: faster than PyTorch eager); compile = flaxdet "
          "trace + XLA compile per shape bucket")
    print(f"wrote {out}")


def _ms(mode, side):
    return lambda r: (r[mode][side]["median_s"] * 1e3) if side in r[mode] else None


def _ratio(mode, side):
    return lambda r: (r[mode]["pytorch"]["median_s"] / r[mode][side]["median_s"]) if side in r[mode] else None


COLS = [("preset", "preset", ""), ("batch", "batch", "d"),
        ("net pt ms", _ms("network", "pytorch"), ".0f"), ("net ort ms", _ms("network", "onnxruntime"), ".0f"),
        ("net fd ms", _ms("network", "flaxdet"), ".0f"), ("net pt/ort", _ratio("network", "onnxruntime"), ".2f"),
        ("net pt/fd", _ratio("network", "flaxdet"), ".2f"),
        ("e2e pt ms", _ms("e2e", "pytorch"), ".0f"), ("e2e fd ms", _ms("e2e", "flaxdet"), ".0f"),
        ("e2e pt/fd", _ratio("e2e", "flaxdet"), ".2f"),
        ("compile s", lambda r: r["e2e"]["flaxdet"]["trace_s"] + r["e2e"]["flaxdet"]["compile_s"], ".1f")]


if __name__ == "__main__":
    main()
