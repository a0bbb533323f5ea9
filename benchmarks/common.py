"""Shared helpers of the benchmark scripts: machine description, seeded checkpoints, synthetic inputs,
per-side worker subprocesses, timing, tables and JSON.

Device: whatever JAX and torch pick by default. The torch side runs on ``cuda`` when
``torch.cuda.is_available()`` (and synchronises before reading the clock); the flaxdet side on
``jax.default_backend()`` (``block_until_ready``). Nothing here is CPU-specific, so the scripts run
unchanged on a GPU machine.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLASS_BIAS_KEY = "roi_head.bbox_head.fc_cls.bias"
SCENARIOS = ("no-dets", "max-dets")


# -- machine ---------------------------------------------------------------------------------------------

def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                f = set(line.split(":", 1)[1].split())
                return [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in f]
    except OSError:
        pass
    return []


def mem_total_gb():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine():
    """What the figures were measured on (versions, CPU, accelerators, load when measured)."""
    import jax
    import torch

    out = dict(cpu=cpu_model(), cpu_flags=cpu_flags(), cores=os.cpu_count(),
               usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               mem_gb=mem_total_gb(), platform=platform.platform(), python=platform.python_version(),
               torch=torch.__version__, torch_device=torch_device_name(), jax=jax.__version__,
               jax_backend=jax.default_backend(), jax_devices=[str(d) for d in jax.devices()],
               loadavg_at_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    try:
        import flax

        out["flax"] = flax.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_device_name():
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def torch_setup():
    """torch on all the cores it may use (its default on CPU is the physical-core count)."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return torch_device()


def torch_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_mb():
    """Peak resident memory of this process (host; MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mb(side):
    """Peak accelerator memory (MB) where the framework reports it (GPU), else None."""
    try:
        if side == "pytorch":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None
    except Exception:  # noqa: BLE001
        return None


# -- inputs ----------------------------------------------------------------------------------------------

def synthetic_image(h, w, seed=0):
    """A blurred-noise BGR uint8 image with a dozen filled rectangles (structure for the RPN)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(30, w // 3)), y + int(rng.integers(30, h // 3))), c, -1)
    return img


def synthetic_gt(h, w, k, num_classes, seed=0):
    """``k`` random GT boxes with labels and elliptic bitmap masks in an (h, w) image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bw, bh = rng.uniform(16, 0.5 * w, k), rng.uniform(16, 0.5 * h, k)
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1).astype(np.float32)
    yy, xx = np.mgrid[:h, :w] + 0.5
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    masks = (((xx[None] - cx[:, None, None]) / rx[:, None, None]) ** 2
             + ((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2 <= 1).astype(np.uint8)
    return dict(bboxes=boxes, labels=rng.integers(0, num_classes, k).astype(np.int64), masks=masks)


GOLDEN_PHOTOS = ("rtmdet/rtmdet_tiny/coco_test_12510.npz", "rtmdet/rtmdet_tiny/voc_000001.npz",
                 "rtmdet/rtmdet_tiny/color.npz")


def photo_batch(h, w, n, seed=0):
    """(``n`` BGR uint8 (h, w, 3) images, source): random crops (60-100% of each side, every other pass
    flipped) of the real photos recorded in the goldens ($FLAXDET_GOLDENS or ../shared/goldens), resized to
    (h, w); :func:`synthetic_image` s when the goldens are absent."""
    import cv2
    import numpy as np

    root = Path(os.environ.get("FLAXDET_GOLDENS") or REPO.parent / "shared" / "goldens")
    photos = []
    for rel in GOLDEN_PHOTOS:
        if (root / rel).is_file():
            with np.load(root / rel) as z:
                photos.append(z["input_bgr_uint8"])
    if not photos:
        return [synthetic_image(h, w, seed=seed + i) for i in range(n)], "synthetic (no goldens found)"
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        ph, pw = p.shape[:2]
        ch, cw = int(ph * rng.uniform(0.6, 1.0)), int(pw * rng.uniform(0.6, 1.0))
        y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        crop = p[y0:y0 + ch, x0:x0 + cw]
        if (i // len(photos)) % 2:
            crop = crop[:, ::-1]
        out.append(np.ascontiguousarray(cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)))
    return out, "crops of " + ", ".join(Path(r).stem for r in GOLDEN_PHOTOS if (root / r).is_file())


def train_batch(imgs, gts, pad_divisor, gt_capacity):
    """A train step's device batch, as the data pipeline makes it: the (equal-sized) images zero-padded to a multiple
    of ``pad_divisor``, their shapes, and the GT padded to ``gt_capacity`` objects."""
    import jax.numpy as jnp
    import numpy as np

    from flaxdet.data.transforms import own_pad_shape, pad_ground_truth

    h, w = imgs[0].shape[:2]
    hp, wp = own_pad_shape((h, w), pad_divisor)
    images = np.zeros((len(imgs), hp, wp, 3), np.uint8)
    for i, im in enumerate(imgs):
        images[i, :h, :w] = im
    batch = dict(images=images, img_shapes=np.array([(h, w)] * len(imgs), np.int32),
                 pad_shapes=np.array([(hp, wp)] * len(imgs), np.int32))
    batch.update(pad_ground_truth(gts, gt_capacity, hp, wp))
    return {k: jnp.asarray(v) for k, v in batch.items()}


def seeded_state_dict(preset, seed=0):
    """visdet-layout state_dict (numpy) of reference/'s model for ``preset``, torch-seeded."""
    import torch

    from flaxdet.config import load_config
    from flaxdet_reference import build_detector

    torch.manual_seed(seed)
    ref = build_detector(load_config(preset))
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def scenario_weights(sd, scenario):
    """``no-dets``: seeded weights as they are (no score clears score_thr: no detections, no mask head).
    ``max-dets``: the classifier bias of 10 classes raised by 3, so every proposal clears score_thr
    and both sides return max_per_img = 100 detections with masks (a trained model on a busy image)."""
    w = dict(sd)
    if scenario == "max-dets":
        b = w[CLASS_BIAS_KEY].copy()
        b[:10] += 3.0
        w[CLASS_BIAS_KEY] = b
    return w


def write_checkpoint(path, sd, classes=None):
    from flaxdet_converters.checkpoint_io import save_checkpoint

    return save_checkpoint(path, sd, classes=classes)


# -- running and timing ----------------------------------------------------------------------------------

def timed(fn, repeats, sync=lambda r: r):
    """(first call s, [repeat s], last result): one untimed-for-the-median first call, then ``repeats``."""
    t = time.perf_counter()
    r = sync(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = sync(fn())
        times.append(time.perf_counter() - t)
    return first, times, r


def matmul_peaks(n=2048, repeats=5):
    """GFLOP/s of an n x n x n matmul under XLA:CPU: float32, and bfloat16 operands with float32 results (the
    ceiling of flaxdet's float32 and bf16 compute on this machine; median of ``repeats``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = {}
    f = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32), dt)
        _, times, _ = timed(lambda a=a: f(a), repeats, jax.block_until_ready)
        out[name] = 2.0 * n ** 3 / statistics.median(times) / 1e9
    return out


def detector_gflop(det, batch, rows=None):
    """XLA's count of the floating-point operations (GFLOP) of what ``Detector.predict_batch`` runs on ``batch``:
    the box jit, and the mask jit on ``rows`` rows when given (mask models with detections), else the one-jit
    predict. Counted on the programs as lowered with XLA's own convolutions and without the loops that only split
    the same work (``image_loop``, ``mask_head_chunks``): XLA counts a loop body once, and the onednn_conv fast
    path's FFI calls are opaque to it; the operations are the same. Compiles nothing."""
    import jax
    import jax.numpy as jnp

    from flaxdet import fast_paths
    from flaxdet.inference import Detector, _has_masks, _mask_jit_split

    args = (det.state, jnp.asarray(batch.images), jnp.asarray(batch.img_shapes), jnp.asarray(batch.scale_factors))
    with fast_paths.use(fast_paths.active() - {"onednn_conv", "image_loop", "mask_head_chunks"}):
        if not _mask_jit_split(det.model):
            canvas = batch.canvas_hw if _has_masks(det.model) else None
            lowered = [Detector._predict.lower(det, *args, canvas, True, False)]
        else:
            lowered = [Detector._predict_boxes.lower(det, *args, True)]
            if rows:
                dets, neck = jax.eval_shape(lambda *a: det._predict_boxes(*a, True), *args)
                lowered.append(Detector._predict_masks.lower(det, det.state, neck, dets, args[3], batch.canvas_hw,
                                                             True, rows))
        return sum(float(lo.cost_analysis()["flops"]) for lo in lowered) / 1e9


def summarize(times):
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), times_s=times)


def run_worker(script, spec, env=None):
    """Run ``script --worker JSON`` in a fresh interpreter (so peak RSS and caches are its own);
    return the JSON dict it prints last. Raises SystemExit with its stderr tail on failure."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    if env is None:  # compile times are cold ones: no persistent XLA cache (flaxdet's CLI enables one)
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if r.returncode:
        raise SystemExit(f"worker {spec} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # glibc malloc settings change both sides' times a lot (docs/performance.md#host-memory-page-faults)
    out["malloc_env"] = {k: v for k, v in env.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    return out


def emit(result):
    """A worker's last stdout line: its JSON result."""
    print(json.dumps(result), flush=True)


def save(name, payload, out=None):
    p = Path(out) if out else RESULTS / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=1))
    return p


def table(rows, cols):
    """rows: list of dicts; cols: [(header, key or callable, format)] -> aligned text table."""
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        line = []
        for _, k, f in cols:
            v = k(r) if callable(k) else r.get(k)
            line.append("-" if v is None else format(v, f) if f else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    fmt = lambda c: "  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(c) for c in cells[1:]])


def md_table(rows, cols):
    """The same as :func:`table` in markdown."""
    out = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for _, k, f in cols:
            v = k(r) if callable(k) else r.get(k)
            vals.append("-" if v is None else format(v, f) if f else str(v))
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out)


def dtype_columns(cols, dtypes, compile_fmt=".1f", rss=("RSS pt/fd MB", "/")):
    """``cols`` plus, per flaxdet compute dtype, its median and ratio, then compile times and peak RSS
    (rows carry ``pytorch``, ``flaxdet[dtype]``, ``ratio[dtype]`` and ``dtypes``). ``rss``: (header,
    separator) of the peak-RSS column."""
    cols = list(cols)
    for dt in dtypes:
        cols += [(f"flaxdet {dt} s", lambda r, dt=dt: r["flaxdet"][dt]["median_s"], ".2f"),
                 (f"ratio {dt}", lambda r, dt=dt: r["ratio"][dt], ".2f")]
    cols += [(f"compile {dt} s", lambda r, dt=dt: r["flaxdet"][dt]["trace_s"] + r["flaxdet"][dt]["compile_s"],
              compile_fmt) for dt in dtypes]
    head, sep = rss
    cols += [(head, lambda r: f"{r['pytorch']['peak_rss_mb']:.0f}{sep}"
              + sep.join(f"{r['flaxdet'][dt]['peak_rss_mb']:.0f}" for dt in r["dtypes"]), "")]
    return cols


def run_sides(script, base, dtypes):
    """The PyTorch worker, then flaxdet's per compute dtype, on the same ``base`` spec (each printed as a JSON
    line). Returns (pytorch, {dtype: flaxdet}, {dtype: pytorch / flaxdet median})."""
    pt = run_worker(script, dict(base, side="pytorch"))
    print(json.dumps(pt), flush=True)
    fd = {}
    for dt in dtypes:
        fd[dt] = run_worker(script, dict(base, side="flaxdet", dtype=dt))
        print(json.dumps(fd[dt]), flush=True)
    return pt, fd, {dt: pt["median_s"] / fd[dt]["median_s"] for dt in fd}


def train_step_columns(dtypes):
    """The table columns of a train-step benchmark (bench_train.py, bench_rtmdet_train.py)."""
    return dtype_columns([("preset", "preset", ""), ("size", "size", ""), ("batch", "batch", "d"),
                          ("pytorch s", lambda r: r["pytorch"]["median_s"], ".2f")], dtypes)


def emit_train_step(out, spec, first, times, logs):
    """A train-step worker's last act (bench_train.py, bench_rtmdet_train.py): timings, peak memory, the last
    step's losses and whether they are finite into ``out``, the checkpoint path dropped, then :func:`emit`."""
    import numpy as np

    out.update(summarize(times), first_call_s=first, peak_rss_mb=peak_rss_mb(),
               device_peak_mb=device_peak_mb(spec["side"]), last_logs=logs,
               finite=bool(all(np.isfinite(v) for v in logs.values())))
    out.pop("ckpt")
    emit(out)
