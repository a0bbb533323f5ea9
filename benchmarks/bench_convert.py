"""Conversion benchmark: an R50 visdet checkpoint (.pth) through the production converter.

    .venv/bin/python benchmarks/bench_convert.py [--preset mask_rcnn_r50] [--repeats 3] [--out F]

The checkpoint: reference/'s seeded Mask R-CNN R50-FPN saved runner-style (``state_dict`` + ``meta``
with 80 class names) as visdet's runner writes it, 44M parameters / 170 MB.

- flaxdet, in one process after the imports: ``flaxdet.tools.convert_checkpoint`` (what ``flaxdet
  convert`` runs: restricted unpickling, config, model build, every key converted and checked, orbax
  model directory written), median over ``repeats`` after one warm-up; its parts (read .pth, build,
  convert, write), the safetensors output format, and ``load_model_dir`` (what ``infer``/``train``/
  ``eval`` pay at start-up for the converted directory).
- flaxdet, cold: the ``flaxdet convert`` command line in a fresh interpreter (imports and JAX start-up
  included), once.
- PyTorch baseline: what visdet pays to get the same weights ready -- build the model, ``torch.load``
  the .pth, ``load_state_dict``.

Ratio = PyTorch load / flaxdet convert (a one-off cost against a per-start cost: read it as "the
conversion costs N PyTorch loads"). Peak RSS per process. Compile time per shape bucket is measured
by bench_infer.py / bench_train.py (``trace_s`` + ``compile_s``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

CLASSES = [f"class_{i}" for i in range(80)]


def worker(spec):
    out = dict(spec)
    ckpt, preset, repeats = spec["ckpt"], spec["preset"], spec["repeats"]
    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_bench_conv_"))
    t = time.perf_counter()
    if spec["side"] == "pytorch":
        import torch

        from flaxdet.config import load_config
        from flaxdet_reference import build_detector

        out["import_s"] = time.perf_counter() - t
        cfg = load_config(preset)

        def run():
            m = build_detector(cfg)
            obj = torch.load(ckpt, map_location="cpu", weights_only=True)
            m.load_state_dict(obj.get("state_dict", obj), strict=True)
            return m

        first, times, _ = common.timed(run, repeats)
    else:
        from flaxdet.checkpoint import load_model_dir, save_model_dir
        from flaxdet.config import load_config
        from flaxdet.models import build_detector
        from flaxdet.tools import convert_checkpoint
        from flaxdet_converters.checkpoint_io import load_checkpoint
        from flaxdet_converters.convert import load_visdet_state_dict

        out["import_s"] = time.perf_counter() - t
        n = iter(range(10**6))

        def run(fmt="orbax"):
            d, report = convert_checkpoint(ckpt, preset, tmp / f"m{next(n)}", fmt, log=lambda *_: None)
            assert report.ok, report.summary()
            return d

        first, times, d = common.timed(run, repeats)
        _, st_times, _ = common.timed(lambda: run("safetensors"), repeats)
        _, load_times, _ = common.timed(lambda: load_model_dir(d), repeats)
        parts = {}
        t = time.perf_counter()
        ck = load_checkpoint(ckpt)
        parts["read_pth_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model = build_detector(load_config(preset))
        parts["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        load_visdet_state_dict(model, ck.state_dict)
        parts["convert_keys_s"] = time.perf_counter() - t
        t = time.perf_counter()
        save_model_dir(tmp / "parts", model, ck.classes, {}, overwrite=True)
        parts["write_orbax_s"] = time.perf_counter() - t
        out.update(parts=parts, safetensors=common.summarize(st_times), load_model_dir=common.summarize(load_times))
    out.update(common.summarize(times), first_call_s=first, peak_rss_mb=common.peak_rss_mb())
    shutil.rmtree(tmp, ignore_errors=True)
    out.pop("ckpt")
    common.emit(out)


def cli_cold(ckpt, preset):
    """``flaxdet convert`` in a fresh interpreter: wall time including imports."""
    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_bench_cli_"))
    cmd = [sys.executable, "-c", "import sys; from flaxdet.cli import main; sys.exit(main())", "convert", ckpt,
           "--config", preset, "--out", str(tmp / "m")]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO)
    wall = time.perf_counter() - t
    shutil.rmtree(tmp, ignore_errors=True)
    if r.returncode:
        raise SystemExit(f"flaxdet convert failed:\n{r.stderr[-3000:]}")
    return wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mask_rcnn_r50")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="JSON path (default benchmarks/results/convert.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))

    tmp = Path(tempfile.mkdtemp(prefix="flaxdet_bench_"))
    sd = common.seeded_state_dict(a.preset)
    ckpt = common.write_checkpoint(tmp / f"{a.preset}.pth", sd, classes=CLASSES)
    machine = common.machine()
    base = dict(ckpt=str(ckpt), preset=a.preset, repeats=a.repeats)
    pt = common.run_worker(__file__, dict(base, side="pytorch"))
    print(json.dumps(pt), flush=True)
    fd = common.run_worker(__file__, dict(base, side="flaxdet"))
    print(json.dumps(fd), flush=True)
    cold = cli_cold(str(ckpt), a.preset)
    row = dict(preset=a.preset, checkpoint_mb=ckpt.stat().st_size / 2**20,
               params_m=sum(v.size for v in sd.values()) / 1e6, pytorch=pt, flaxdet=fd, cli_cold_s=cold,
               ratio=pt["median_s"] / fd["median_s"])
    out = common.save("convert.json", dict(benchmark="convert", machine=machine, preset=a.preset,
                                           repeats=a.repeats, results=[row]), a.out)
    print()
    print(common.table([row], COLS))
    print("convert = flaxdet.tools.convert_checkpoint (.pth -> orbax dir), median; cold = `flaxdet convert` in a "
          "fresh interpreter;\nload = flaxdet.checkpoint.load_model_dir; "
          "pytorch = build + torch.load + load_state_dict; ratio = pytorch / flaxdet convert")
    print("parts: " + ", ".join(f"{k} {v:.2f}" for k, v in fd["parts"].items()))
    print(f"wrote {out}")


COLS = [("preset", "preset", ""), ("ckpt MB", "checkpoint_mb", ".0f"),
        ("pytorch load s", lambda r: r["pytorch"]["median_s"], ".2f"),
        ("flaxdet convert s", lambda r: r["flaxdet"]["median_s"], ".2f"),
        ("ratio", "ratio", ".2f"),
        ("-> safetensors s", lambda r: r["flaxdet"]["safetensors"]["median_s"], ".2f"),
        ("cold CLI s", "cli_cold_s", ".1f"),
        ("load dir s", lambda r: r["flaxdet"]["load_model_dir"]["median_s"], ".2f"),
        ("RSS pt/fd MB", lambda r: f"{r['pytorch']['peak_rss_mb']:.0f}/{r['flaxdet']['peak_rss_mb']:.0f}", "")]


if __name__ == "__main__":
    main()
