"""Training-step benchmark: reference PyTorch eager (visdet's training loss path) vs flaxdet's jitted train step.

    .venv/bin/python benchmarks/bench_train.py [--preset mask_rcnn_r50] [--size 800x1333] [--batch 2]
        [--dtypes float32 bfloat16] [--remat auto] [--repeats 3] [--no-pytorch] [--out F]

One SGD step (visdet's 1x schedule optimizer: momentum 0.9, weight decay 1e-4, lr 0.02) on a batch of
``--batch`` synthetic images of ``--size`` with 5 GT boxes/labels/masks each, same seeded weights (saved
by reference/ as a visdet checkpoint, loaded on each side; flaxdet: by the production converter) and
the same images and GT on both sides.

- PyTorch: ``TwoStageDetector.loss`` (MaxIoUAssigner, RandomSampler on a torch Generator, every loss)
  + ``parse_losses`` + ``backward`` + ``torch.optim.SGD.step`` on the trainable parameters
  (``frozen_stages`` and frozen BN excluded, as visdet).
- flaxdet: ``TrainState.train_step`` (one jit: forward, loss, grad, optax SGD update, frozen mask,
  params and optimizer state donated), synchronised with ``block_until_ready``. Its one-time
  ``trace_s`` + ``compile_s`` are measured ahead-of-time; the timed steps hit the jit cache.
  ``--dtypes bfloat16`` runs the mixed-precision policy (bf16 convolutions/matmuls, float32 params,
  gradients and optimizer state). ``--remat none auto full``: one flaxdet worker per rematerialisation mode
  (``TrainState(remat=...)``; results keyed ``DTYPE/remat=MODE`` when more than one mode is given), each
  reporting its peak RSS after compiling and after the steps, and XLA's buffer sizes of the compiled step
  (``xla_temp_mb``: the step's scratch memory, activations kept for the backward included).
- ``--no-pytorch``: flaxdet only (memory sweeps; single-stage presets such as ``rtmdet_s``, whose PyTorch
  training side this script does not run).

The samplers draw different (equally distributed) RoIs on the two sides; the work per step is the same.
Reported: median / min step time after one warm-up step, peak RSS, the losses of the first step, and
the ratio pytorch / flaxdet (> 1: flaxdet faster). Runs unchanged on a GPU (torch: cuda when available).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common

NUM_GT = 5
SGD = dict(lr=0.02, momentum=0.9, weight_decay=1e-4)


def inputs(h, w, n, num_classes):
    imgs = [common.synthetic_image(h, w, seed=10 + i) for i in range(n)]
    gts = [common.synthetic_gt(h, w, NUM_GT, num_classes, seed=20 + i) for i in range(n)]
    return imgs, gts


def num_classes(cfg):
    from flaxdet.config import final_bbox_head

    return final_bbox_head(cfg.roi_head).num_classes if getattr(cfg, "roi_head", None) else cfg.bbox_head.num_classes


def flaxdet_setup(cfg, ckpt, imgs, gts, dtype, remat="auto"):
    """(TrainState with visdet's SGD, device batch): the checkpoint through the production converter,
    the images padded as the data pipeline pads them, GT padded to a capacity of max(8, NUM_GT)."""

    from flaxdet.models import build_detector
    from flaxdet.training.optimizers import make_optimizer
    from flaxdet.training.step import TrainState
    from flaxdet_converters.checkpoint_io import load_checkpoint
    from flaxdet_converters.convert import load_visdet_state_dict

    model = build_detector(cfg)
    load_visdet_state_dict(model, load_checkpoint(ckpt).state_dict)
    tx, _ = make_optimizer("sgd", SGD["lr"], SGD["weight_decay"], steps_per_epoch=1000, warmup_iters=0,
                           momentum=SGD["momentum"])
    state = TrainState(model, tx, dtype=dtype, remat=remat)
    return state, common.train_batch(imgs, gts, cfg.data_preprocessor.pad_size_divisor, max(8, NUM_GT))


def worker(spec):
    from flaxdet.config import load_config

    cfg = load_config(spec["preset"])
    h, w = (int(v) for v in spec["size"].split("x"))
    imgs, gts = inputs(h, w, spec["batch"], num_classes(cfg))
    out = dict(spec)
    if spec["side"] == "pytorch":
        import torch

        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_reference import build_detector
        from flaxdet_reference.models import load_state_dict_strict
        from flaxdet_reference.models.detectors.two_stage import parse_losses

        dev = common.torch_setup()
        m = build_detector(cfg)
        load_state_dict_strict(m, load_checkpoint(spec["ckpt"]).state_dict)
        m.to(dev)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, **SGD)
        xs = [torch.from_numpy(im).permute(2, 0, 1).contiguous().to(dev) for im in imgs]
        metas = [dict(img_shape=(h, w)) for _ in imgs]
        gen = torch.Generator().manual_seed(0)

        def step():
            opt.zero_grad()
            total, log = parse_losses(m.loss(xs, metas, gts, generator=gen))
            total.backward()
            opt.step()
            return {k: float(v.detach()) for k, v in log.items()}

        def sync(r):
            common.torch_sync()
            return r

        out.update(device=str(dev), dtype="float32", trainable_params=len(params))
    else:
        import jax
        import jax.numpy as jnp

        if spec.get("auto_plan") is not None:
            from flaxdet.training import step as step_mod

            step_mod.AUTO_REMAT = {None: spec["auto_plan"]}
        state, batch = flaxdet_setup(cfg, spec["ckpt"], imgs, gts, spec["dtype"], spec.get("remat", "auto"))
        key = jax.random.PRNGKey(0)
        t = time.perf_counter()
        lowered = state.lower(batch, key)  # the first step's mask rows: the smallest bucket
        t1 = time.perf_counter()
        compiled = lowered.compile()  # fills the jit cache: train_step below does not compile again
        out.update(trace_s=t1 - t, compile_s=time.perf_counter() - t1, device=str(jax.devices()[0]),
                   remat_units=len(state.remat), peak_rss_compiled_mb=common.peak_rss_mb())
        mem = compiled.memory_analysis()
        if mem is not None:  # XLA's buffer assignment: temp = the step's scratch (kept activations included)
            out.update({f"xla_{k}_mb": getattr(mem, f"{k}_size_in_bytes") / 2**20
                        for k in ("temp", "argument", "output", "generated_code")})
        del compiled
        # one step shows the positives (re-run, and compiled, with a bigger bucket when they overflow);
        # later steps run the mask branch on the bucket holding them (TrainState.mask_rows): compiled
        # here too, outside the timed steps
        jax.block_until_ready(state.train_step(batch, jax.random.fold_in(key, 10**6)))
        if state.mask_rows() != state.last_mask_rows:
            t = time.perf_counter()
            state.lower(batch, key).compile()
            out.update(compile_bucket_s=time.perf_counter() - t)
        out.update(mask_rows=state.mask_rows(), mask_rows_needed=state.needed_rows[-1] if state.needed_rows else None)
        counter = iter(range(10**9))

        def step():
            return state.train_step(batch, jax.random.fold_in(key, next(counter)))

        def sync(logs):
            jax.block_until_ready(state.params)
            return {k: float(v) for k, v in jax.device_get(logs).items()}

    first, times, logs = common.timed(step, spec["repeats"], sync)
    if spec["side"] == "flaxdet":
        dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(state.params)})
        out.update(param_dtypes=dtypes, opt_state_dtypes=sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(
            state.opt_state) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}))
    common.emit_train_step(out, spec, first, times, logs)


columns = common.train_step_columns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mask_rcnn_r50")
    p.add_argument("--size", default="800x1333", help="HxW of the network input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--remat", nargs="+", default=["auto"], choices=["none", "auto", "full"],
                   help="flaxdet's rematerialisation mode(s) (TrainState(remat=...)); one worker per mode")
    p.add_argument("--no-pytorch", action="store_true", help="flaxdet workers only")
    p.add_argument("--auto-plan", help="what --remat auto rematerialises in this run (to choose step.AUTO_REMAT by "
                   "measurement): KIND=POLICY,... with KIND backbone/neck/head, POLICY nothing/dots")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up step (median reported)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/train.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))

    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_bench_"))
    ckpt = str(common.write_checkpoint(tmp / f"{a.preset}.pth", common.seeded_state_dict(a.preset)))
    machine = common.machine()
    base = dict(ckpt=ckpt, preset=a.preset, size=a.size, batch=a.batch, repeats=a.repeats)
    if a.auto_plan:
        base["auto_plan"] = dict(kv.split("=") for kv in a.auto_plan.split(",") if kv)
    if len(a.remat) == 1 and not a.no_pytorch:
        base["remat"] = a.remat[0]
        pt, fd, ratio = common.run_sides(__file__, base, a.dtypes)
        keys = a.dtypes
    else:  # one flaxdet worker per (dtype, remat mode)
        pt = None if a.no_pytorch else common.run_worker(__file__, dict(base, side="pytorch"))
        if pt is not None:
            print(json.dumps(pt), flush=True)
        fd = {}
        for dt in a.dtypes:
            for mode in a.remat:
                k = dt if len(a.remat) == 1 else f"{dt}/remat={mode}"
                fd[k] = common.run_worker(__file__, dict(base, side="flaxdet", dtype=dt, remat=mode))
                print(json.dumps(fd[k]), flush=True)
        ratio = {k: pt["median_s"] / v["median_s"] for k, v in fd.items()} if pt is not None else {}
        keys = list(fd)
    rows = [dict(preset=a.preset, size=a.size, batch=a.batch, dtypes=keys, remat=a.remat, pytorch=pt, flaxdet=fd,
                 ratio=ratio)]
    out = common.save("train.json", dict(benchmark="train", machine=machine, preset=a.preset,
                                         optimizer=dict(SGD, name="sgd"), gt_per_image=NUM_GT, repeats=a.repeats,
                                         results=rows), a.out)
    print()
    if pt is not None:
        print(common.table(rows, columns(keys)))
    print(common.table([dict(key=k, **v) for k, v in fd.items()],
                       [("flaxdet", "key", ""), ("median s", "median_s", ".2f"), ("compile s", lambda r: r["trace_s"]
                         + r["compile_s"], ".1f"), ("RSS compiled MB", "peak_rss_compiled_mb", ".0f"),
                        ("peak RSS MB", "peak_rss_mb", ".0f"), ("XLA temp MB", lambda r: r.get("xla_temp_mb", 0),
                                                                ".0f")]))
    print("step time (median); ratio = pytorch / flaxdet (> 1: flaxdet faster); compile = trace + XLA compile")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
