"""Where the training-step time goes: a jax.profiler trace of flaxdet's jitted train step, its XLA ops
summed by kind, by forward/backward and by area (the RoIAlign calls, other conditional branches).

    .venv/bin/python benchmarks/profile_train.py [--preset mask_rcnn_r50] [--size 480x640] [--batch 2]
        [--dtype float32] [--remat auto] [--top 25] [--trace DIR]

Same inputs and weights as bench_train.py (two-stage presets) or bench_rtmdet_train.py (RTMDet presets, AdamW:
``--preset rtmdet_s --size 640x640 --batch 8`` is its step). One warm-up step (compiles; its positives pick the mask
branch's row bucket), then one traced step. Each XLA op of the optimised HLO is attributed through its
``op_name`` metadata: ``bwd`` when JAX's autodiff transposed it, ``roi_align`` inside either RoIAlign path,
``cond branch`` inside any other ``lax.cond``/``lax.switch`` branch; control-flow ops (cond, while) are not
summed, the ops inside them are. ``ynn_fusion`` / ``convolution`` / ``dot`` are the convolution and matmul
kernels. XLA:CPU runs independent ops concurrently, so op times can sum to more than the
step. Prints the table and writes benchmarks/results/profile_train.json; the raw trace stays in DIR
(Perfetto / TensorBoard), with the step's optimised HLO (``step.hlo.txt``: an op's shape and inputs).
An op's span includes time waiting for a core, so with two cores a copy that runs beside a long
convolution can show several times its cost: compare ops of one kind across runs, not to the step.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import common
from bench_train import NUM_GT, flaxdet_setup, inputs, num_classes


def categorise(events, hlo_text):
    """{(kind, fwd/bwd, area): microseconds} of the trace's XLA op events."""
    op_names = dict(re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text, re.M))
    out = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if (e.get("ph") != "X" or name.startswith(("ThunkExecutor", "SlinkyThreadPool"))
                or not re.match(r"[\w.\-]+$", name)):
            continue  # executor bookkeeping and Python-side events
        kind = re.sub(r"(\.clone|\.\d+)*$", "", name)
        if kind in ("cond", "while", "call", "conditional"):
            continue  # control flow: its span holds the ops inside it, counted on their own
        op = op_names.get(name, "")
        area = "roi_align" if "roi_align" in op else ("cond branch" if "cond/branch" in op else "")
        out[(kind, "bwd" if "transpose(" in op else "fwd", area)] += e.get("dur", 0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mask_rcnn_r50",
                   help="a two-stage preset (bench_train.py's inputs, SGD) or an RTMDet one (bench_rtmdet_train.py's "
                   "inputs, 8 GT per image, AdamW; e.g. --preset rtmdet_s --size 640x640 --batch 8)")
    p.add_argument("--size", default="480x640", help="HxW of the network input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="auto", choices=["none", "auto", "full"],
                   help="rematerialisation mode of the step (TrainState(remat=...))")
    p.add_argument("--top", type=int, default=25, help="rows of the printed table")
    p.add_argument("--trace", help="directory for the raw jax.profiler trace (default: a temporary one)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/profile_train.json)")
    a = p.parse_args(argv)

    import jax

    from flaxdet.config import is_two_stage, load_config

    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_prof_"))
    if is_two_stage(load_config(a.preset)):
        cfg = load_config(a.preset)
        h, w = (int(v) for v in a.size.split("x"))
        ckpt = common.write_checkpoint(tmp / f"{a.preset}.pth", common.seeded_state_dict(a.preset))
        imgs, gts = inputs(h, w, a.batch, num_classes(cfg))
        state, batch = flaxdet_setup(cfg, ckpt, imgs, gts, a.dtype, a.remat)
        gt_per_image = NUM_GT
    else:  # RTMDet / RTMDet-Ins: bench_rtmdet_train.py's weights, inputs and AdamW
        import bench_rtmdet_train as rtm

        cfg = rtm._cfg(a.preset)
        spec = dict(ckpt=rtm.seeded_checkpoint(a.preset, tmp), size=a.size, batch=a.batch, gt=8, optimizer="adamw",
                    dtype=a.dtype, remat=a.remat)
        imgs, gts, _ = rtm._inputs(spec, "Ins" in cfg.bbox_head.TYPE)
        state, batch = rtm.flaxdet_setup(cfg, spec, imgs, gts)
        gt_per_image = spec["gt"]
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(state.train_step(batch, key))  # warm-up: its positives pick the mask rows
    hlo = state.lower(batch, key).compile().as_text()
    jax.block_until_ready(state.train_step(batch, key))  # (the jit cache holds that bucket now)
    trace = Path(a.trace or tmp / "trace")
    trace.mkdir(parents=True, exist_ok=True)
    (trace / "step.hlo.txt").write_text(hlo)  # op names in the trace -> shapes and fused computations
    t = time.perf_counter()
    with jax.profiler.trace(str(trace), create_perfetto_trace=True):
        logs = state.train_step(batch, jax.random.fold_in(key, 1))
        jax.block_until_ready((state.params, logs))
    step_s = time.perf_counter() - t
    files = sorted(trace.glob("**/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    events = json.load(gzip.open(files[-1]))
    cats = categorise(events["traceEvents"] if isinstance(events, dict) else events, hlo)
    total = sum(cats.values())
    rows = [dict(kind=k[0], pass_=k[1], area=k[2] or "-", ms=v / 1e3, share=v / max(total, 1))
            for k, v in cats.most_common()]
    print(f"traced step (profiler on): {step_s:.2f} s; XLA op time summed: {total / 1e6:.2f} s")
    print(common.table(rows[: a.top], [("op kind", "kind", ""), ("pass", "pass_", ""), ("area", "area", ""),
                                        ("ms", "ms", ".0f"), ("share", "share", ".1%")]))
    out = common.save("profile_train.json", dict(
        benchmark="profile_train", machine=common.machine(), preset=a.preset, size=a.size, batch=a.batch,
        dtype=a.dtype, remat=a.remat, gt_per_image=gt_per_image, traced_step_s=step_s, op_time_s=total / 1e6,
        trace_dir=str(trace), rows=rows), a.out)
    print(f"wrote {out}; trace in {trace}")


if __name__ == "__main__":
    main()
