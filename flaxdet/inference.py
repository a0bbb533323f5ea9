"""Batched, jit-compiled inference: visdet's test pipeline + the static-shape predict path.

Shape buckets. ``bucket="exact"`` (default): a batch is padded to a multiple of ``pad_size_divisor``
(32) -- exactly visdet's own padding, so bucketing costs no parity. ``bucket="coarse"``: padded to
multiples of 128, for datasets of many image sizes (each new padded size costs one XLA compile, about
10 s on CPU for the tiny test model); the extra zero padding changes features within a few pixels of
the right/bottom border by float noise -- detections stay equal in practice but are no longer
guaranteed bit-comparable with visdet. The mask canvas is padded to a multiple of 256 either way
(masks are cropped back to each original size on the host, which costs no parity).

Many images (:func:`detect_stream`, :meth:`Detector.stream`, ``flaxdet infer`` on a folder): decoding and
resizing run in background threads, images are batched by shape bucket (each batch one padded shape, so no
image is padded more than alone), the model runs in its own thread while the caller handles earlier results,
and results come back in input order. A batch's detections are those of :meth:`Detector.detect` on the same
images (at batch 1, those of one image at a time; a batch of several rounds some convolutions differently).
"""
from __future__ import annotations

import glob
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet.config import TwoStageDetectorCfg, test_scale
from flaxdet.data.transforms import ImageError, load_image, resize_keep_ratio
from flaxdet.fast_paths.mask_rows import mask_rows_for_count
from flaxdet.models import TwoStageDetector, build_detector
from flaxdet.nn import Conv2d, ConvTranspose2d, Linear, set_compute_dtype


def _round_up(x, d):
    return int(math.ceil(x / d)) * d


@dataclass
class Batch:
    images: np.ndarray  # (N, Hp, Wp, 3) uint8, zero padded
    img_shapes: np.ndarray  # (N, 2) int32 (h, w) after resize
    scale_factors: np.ndarray  # (N, 4) float32 [w, h, w, h]
    ori_shapes: list  # [(h, w)] per image
    canvas_hw: tuple  # static mask canvas (>= every ori shape)


BUCKET_DIVISORS = {"exact": None, "coarse": 128}


def make_batch(images, metas, pad_size_divisor=32, canvas_divisor=256) -> Batch:
    """images: list of resized (H, W, 3) uint8 arrays; metas: dicts with ori_shape, img_shape, scale_factor."""
    hp = _round_up(max(im.shape[0] for im in images), pad_size_divisor)
    wp = _round_up(max(im.shape[1] for im in images), pad_size_divisor)
    out = np.zeros((len(images), hp, wp, 3), np.uint8)
    for i, im in enumerate(images):
        out[i, : im.shape[0], : im.shape[1]] = im
    sf = []
    for m in metas:
        s = list(m["scale_factor"])
        sf.append(s if len(s) == 4 else s[:2] * 2)
    ori = [tuple(int(v) for v in m["ori_shape"][:2]) for m in metas]
    canvas = (_round_up(max(o[0] for o in ori), canvas_divisor), _round_up(max(o[1] for o in ori), canvas_divisor))
    return Batch(out, np.array([m["img_shape"][:2] for m in metas], np.int32), np.array(sf, np.float32), ori, canvas)


@dataclass
class Detections:
    """One image's detections, in its original pixels, best first."""

    boxes: np.ndarray  # (K, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (K,) float32
    labels: np.ndarray  # (K,) int64 class indices
    class_names: list  # (K,) the labels' class names (their numbers as text when the model has none)
    masks: np.ndarray | None = None  # (K, H, W) bool for mask models

    def __len__(self):
        return len(self.scores)


class Detector:
    """A flaxdet detector (two-stage or RTMDet) with a jit cache per shape bucket.

    ``det(image)`` runs visdet's test pipeline on an image path or an (H, W, 3) uint8 BGR array (OpenCV
    decode, keep-ratio resize to ``scale``, the model) and returns :class:`Detections`; ``det([...])`` a
    list of them. ``det.params`` are the weights as a JAX pytree, ``det.model`` the Flax NNX module.
    """

    def __init__(self, model: TwoStageDetector, classes=None, dtype=None):
        """``dtype``: compute dtype of the convolutions and matmuls ("bfloat16" for mixed precision,
        "float32"; None keeps the model's, float32 unless set): see :func:`flaxdet.nn.set_compute_dtype`.
        Parameters stay float32; the model's layers are set in place."""
        if dtype is not None:
            set_compute_dtype(model, dtype)
        self.model = model
        self.cfg: TwoStageDetectorCfg = model.cfg
        self.classes = list(classes) if classes is not None else None
        self.graphdef, self.state = _split(model)
        self._compiled = {}

    @classmethod
    def from_config(cls, cfg, seed=0, classes=None, dtype=None):
        return cls(build_detector(cfg, seed), classes, dtype)

    @property
    def params(self):
        """The model's parameters (``nnx.Param`` leaves) as an ``nnx.State`` pytree, named like visdet's keys."""
        return nnx.state(self.model, nnx.Param)

    def __call__(self, images, scale=None, bucket="exact"):
        """Detections for one image (a path or an (H, W, 3) uint8 BGR array) or a list of them (one at a
        time: visdet's test batch size, so results do not depend on what else is in the list). ``scale``: the
        keep-ratio resize bounds (default: the model's test pipeline, :func:`flaxdet.config.test_scale`)."""
        scale = scale or test_scale(self.cfg)
        single = isinstance(images, str | Path | np.ndarray)
        out = []
        for image in [images] if single else list(images):
            img = load_image(image) if isinstance(image, str | Path) else np.asarray(image)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"an image array must be (H, W, 3) uint8 BGR, got {img.shape} {img.dtype}")
            resized, meta = resize_keep_ratio(img, scale)
            d = self.detect([resized], [meta], bucket=bucket)[0]
            names = [self.classes[i] if self.classes and i < len(self.classes) else str(i) for i in d["labels"]]
            out.append(Detections(d["bboxes"], d["scores"], d["labels"], names, d.get("masks")))
        return out[0] if single else out

    def stream(self, images, batch_size=1, scale=None, bucket="exact", workers=2):
        """Detections for many images, in input order: yields ``(source, Detections)``, or ``(source, ImageError)``
        for an input that cannot be read (not raised). ``images``: paths, folders (their image files, sorted),
        glob patterns ("photos/*.jpg") and (H, W, 3) uint8 BGR arrays. Decoding and resizing run in ``workers``
        threads, batches of up to ``batch_size`` images of one shape bucket run while the caller handles the
        previous results (:func:`detect_stream`)."""
        scale = scale or test_scale(self.cfg)
        for r in detect_stream(self, expand_inputs(images), scale, batch_size, bucket,
                               self.cfg.data_preprocessor.pad_size_divisor, workers):
            if r.error is not None:
                yield r.source, r.error
                continue
            d = r.detections
            names = [self.classes[i] if self.classes and i < len(self.classes) else str(i) for i in d["labels"]]
            yield r.source, Detections(d["bboxes"], d["scores"], d["labels"], names, d.get("masks"))

    def refresh(self):
        """Call after changing the model's variables in place."""
        self.graphdef, self.state = _split(self.model)

    @partial(jax.jit, static_argnums=(0, 5, 6, 7))
    def _predict(self, state, images, img_shapes, scale_factors, canvas_hw, rescale, with_stages):
        model = nnx.merge(self.graphdef, state)
        return model.predict(images, img_shapes, scale_factors, canvas_hw, rescale, with_stages)

    @partial(jax.jit, static_argnums=(0, 5))
    def _predict_boxes(self, state, images, img_shapes, scale_factors, rescale):
        return nnx.merge(self.graphdef, state).predict_boxes(images, img_shapes, scale_factors, rescale)

    @partial(jax.jit, static_argnums=(0, 5, 6, 7))
    def _predict_masks(self, state, neck, dets, scale_factors, canvas_hw, rescale, rows):
        return nnx.merge(self.graphdef, state).roi_head.predict_mask(neck, dets, scale_factors, canvas_hw, rescale,
                                                                     rows)[0]

    def __hash__(self):
        return id(self)

    def compile(self, batch: Batch, rescale=True):
        """Compile ahead of time what :meth:`predict_batch` runs on ``batch`` (filling the jit caches):
        the one-jit predict, or for mask models the box jit and the mask jit of the row bucket this
        batch's detections need (read from one run of the box jit). Returns dict(trace_s, compile_s):
        tracing + lowering, and XLA compilation, summed over the jits."""
        args = (self.state, jnp.asarray(batch.images), jnp.asarray(batch.img_shapes), jnp.asarray(batch.scale_factors))
        tr = co = 0.0

        def aot(fn, *a):
            nonlocal tr, co
            t = time.perf_counter()
            lowered = fn.lower(self, *a)
            t1 = time.perf_counter()
            lowered.compile()
            tr, co = tr + t1 - t, co + time.perf_counter() - t1

        if not _mask_jit_split(self.model):
            aot(Detector._predict, *args, batch.canvas_hw if _has_masks(self.model) else None, rescale, False)
        else:
            aot(Detector._predict_boxes, *args, rescale)
            dets, neck = self._predict_boxes(*args, rescale)
            aot(Detector._predict_masks, self.state, neck, dets, args[3], batch.canvas_hw, rescale, _mask_rows(dets))
        return dict(trace_s=tr, compile_s=co)

    def predict_batch(self, batch: Batch, rescale=True, with_stages=False):
        """Device arrays (padded, with ``valid``); see :meth:`detect` for per-image numpy results.

        Mask models without ``with_stages`` run two jits: boxes, then -- after reading the batch's
        largest detection count -- the mask branch on the smallest row bucket holding it (a static
        shape; ``mask_buckets``), none when there are no detections. ``with_stages`` runs one jit
        (the mask branch picks its bucket in a ``lax.switch``)."""
        images, shapes, sfs = (jnp.asarray(batch.images), jnp.asarray(batch.img_shapes),
                               jnp.asarray(batch.scale_factors))
        if not _mask_jit_split(self.model) or with_stages:
            canvas = batch.canvas_hw if _has_masks(self.model) else None
            return self._predict(self.state, images, shapes, sfs, canvas, rescale, with_stages)
        dets, neck = self._predict_boxes(self.state, images, shapes, sfs, rescale)
        return self._predict_masks(self.state, neck, dets, sfs, batch.canvas_hw, rescale, _mask_rows(dets))

    def detect(self, images, metas, rescale=True, bucket="exact"):
        """Per image: dict(bboxes (n,4), scores (n,), labels (n,)[, masks (n, h, w) bool]) in numpy,
        padding removed, masks cropped to the original size."""
        div = BUCKET_DIVISORS[bucket] or self.cfg.data_preprocessor.pad_size_divisor
        batch = make_batch(images, metas, div)
        dets = jax.device_get(self.predict_batch(batch, rescale))
        return unpad(dets, batch)


def _split(model):
    """``nnx.split(model)``, with each Conv2d / ConvTranspose2d / Linear weight whose layer has a compute dtype
    (bf16) cast to it once here instead of in every call of the jits (the same values: the layers cast their
    weights to the compute dtype first). The model's own parameters stay float32."""
    graphdef, state = nnx.split(model)
    layers = {tuple(path): m.compute_dtype for path, m in nnx.iter_modules(model)
              if isinstance(m, Conv2d | ConvTranspose2d | Linear) and m.compute_dtype is not None}
    if not layers:
        return graphdef, state

    def cast(path, x):
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        dt = layers.get(keys[:-2]) if keys[-2:] == ("weight", "value") else None
        return x if dt is None else x.astype(dt)

    return graphdef, jax.tree_util.tree_map_with_path(cast, state)


def _has_masks(model) -> bool:
    """The model predicts masks: a two-stage model's RoI mask branch, a one-stage model's mask head."""
    head = getattr(model, "roi_head", None)
    return head.with_mask if head is not None else bool(getattr(model, "with_mask", False))


def _mask_jit_split(model) -> bool:
    """Mask R-CNN style: boxes in one jit, the RoI mask branch on a row bucket in a second (one-stage mask heads
    predict their masks in the one jit)."""
    return getattr(model, "roi_head", None) is not None and model.roi_head.with_mask


def _mask_rows(dets):
    """The mask branch's static rows for a batch's box detections: one host read of its largest count."""
    return mask_rows_for_count(dets["valid"].shape[1], int(jax.device_get(dets["valid"].sum(1).max())))


def unpad(dets, batch: Batch):
    results = []
    for i, (h, w) in enumerate(batch.ori_shapes):
        v = np.asarray(dets["valid"][i])
        r = {k: np.asarray(dets[k][i])[v] for k in ("bboxes", "scores", "labels")}
        r["labels"] = r["labels"].astype(np.int64)
        if "masks" in dets:
            m, c = np.asarray(dets["masks"][i]), int(v.sum())
            # the valid rows come first (NMS order): copy just them, cropped (not c canvases)
            r["masks"] = np.array(m[:c, :h, :w]) if v[:c].all() else m[v][:, :h, :w]
        results.append(r)
    return results


# -- many images: inputs, batches by shape bucket, the pipeline ----------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm")


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def expand_inputs(inputs):
    """Image inputs as given -> one entry per image, in order: a file path as it is, a folder as its image files
    (by suffix, :data:`IMAGE_SUFFIXES`; sorted, not recursive), a glob pattern that names no file as its matches
    (sorted), an array as it is. A folder without image files or a pattern matching nothing becomes an
    :class:`ImageError` entry (reported and skipped like an unreadable file)."""
    if isinstance(inputs, str | Path | np.ndarray):
        inputs = [inputs]
    out = []
    for x in inputs:
        if isinstance(x, np.ndarray | ImageError):
            out.append(x)
            continue
        p = Path(x)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            out += files or [ImageError(f"{p} is a folder without image files ({', '.join(IMAGE_SUFFIXES)})")]
        elif not p.exists() and _is_glob(str(x)):
            files = sorted(Path(f) for f in glob.glob(str(x)) if Path(f).is_file())
            out += files or [ImageError(f"no file matches {x}")]
        else:
            out.append(p)
    return out


class _Batcher:
    """Forms batches by shape bucket (see :func:`plan_batches`): ``add`` each input in order (``key`` None: no
    image), it returns the batches that are ready; ``rest`` the remaining ones, oldest first."""

    def __init__(self, batch_size, window):
        self.batch_size, self.window, self.open = batch_size, window, {}

    def add(self, i, key, item):
        ready = []
        if key is not None:
            self.open.setdefault(key, []).append((i, item))
            if len(self.open[key]) == self.batch_size:
                ready.append(self.open.pop(key))
        while self.open:
            oldest = min(self.open, key=lambda b: self.open[b][0][0])
            if i - self.open[oldest][0][0] < self.window:
                break
            ready.append(self.open.pop(oldest))
        return [[item for _, item in b] for b in ready]

    def rest(self):
        out = sorted(self.open.values(), key=lambda b: b[0][0])
        self.open = {}
        return [[item for _, item in b] for b in out]


def plan_batches(keys, batch_size, window=None):
    """Batches of input positions by shape bucket, as :func:`detect_stream` forms them: ``keys[i]`` is image i's
    bucket (None: no image, never batched). Images join their bucket's open batch; a batch goes when it holds
    ``batch_size`` images, or -- so that results leave in input order without waiting long -- when its first
    image is ``window`` (default ``4 * batch_size``) positions behind the newest input; the rest go at the end,
    oldest first. Deterministic: the same inputs give the same batches, whatever the timing."""
    b = _Batcher(batch_size, window or 4 * batch_size)
    out = []
    for i, k in enumerate(keys):
        out += b.add(i, k, i)
    return out + b.rest()


@dataclass
class StreamResult:
    """One input of :func:`detect_stream`."""

    index: int
    source: object  # the path (or array) as given
    image: np.ndarray | None  # the decoded original (H, W, 3) uint8 BGR, None when unreadable
    detections: dict | None  # Detector.detect's per-image dict, None when unreadable
    error: Exception | None = None


@dataclass
class _Loaded:
    index: int
    source: object
    image: np.ndarray | None = None
    resized: np.ndarray | None = None
    meta: dict | None = None
    error: Exception | None = None


def _load(index, source, scale):
    if isinstance(source, Exception):
        return _Loaded(index, source, error=source)
    try:
        img = load_image(source) if isinstance(source, str | Path) else np.asarray(source)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ImageError(f"an image array must be (H, W, 3) uint8 BGR, got {img.shape} {img.dtype}")
    except ImageError as e:
        return _Loaded(index, source, error=e)
    resized, meta = resize_keep_ratio(img, scale)
    return _Loaded(index, source, img, resized, meta)


_DONE = object()


def detect_stream(det, inputs, scale, batch_size=1, bucket="exact", pad_divisor=32, workers=2, window=None):
    """Pipelined :meth:`Detector.detect` over many inputs; yields :class:`StreamResult` in input order.

    ``inputs``: paths, arrays or exceptions (see :func:`expand_inputs`). ``workers`` threads decode and resize
    (OpenCV releases the GIL) up to a few batches ahead; a model thread forms batches by shape bucket as
    :func:`plan_batches` does (a bucket: the resized size padded to ``pad_divisor``, or 128 with
    ``bucket="coarse"``) and runs ``det.detect`` on each, while the caller's thread consumes earlier results;
    at most two batches of results wait for the caller. An exception in the model thread is raised in the
    caller's after the results before it."""
    inputs = list(inputs)
    window = window or 4 * batch_size
    div = BUCKET_DIVISORS[bucket] or pad_divisor
    results, stop = queue.Queue(maxsize=2), threading.Event()

    def put(msg):
        while not stop.is_set():
            try:
                results.put(msg, timeout=0.1)
                return
            except queue.Full:
                continue

    def run(batch):
        if stop.is_set():
            return
        dets = det.detect([b.resized for b in batch], [b.meta for b in batch], bucket=bucket)
        put([StreamResult(b.index, b.source, b.image, d) for b, d in zip(batch, dets)])

    def model_thread():
        try:
            with ThreadPoolExecutor(max(1, workers), thread_name_prefix="flaxdet-load") as pool:
                todo, ahead = iter(enumerate(inputs)), deque()

                def fill():  # decode a few batches ahead, no more (memory)
                    while len(ahead) < window + 2 * batch_size:
                        nxt = next(todo, None)
                        if nxt is None:
                            return
                        ahead.append(pool.submit(_load, *nxt, scale))

                batcher = _Batcher(batch_size, window)
                fill()
                while ahead and not stop.is_set():
                    rec = ahead.popleft().result()
                    fill()
                    key = None
                    if rec.error is not None:
                        put([StreamResult(rec.index, rec.source, None, None, rec.error)])
                    else:
                        h, w = rec.resized.shape[:2]
                        key = (_round_up(h, div), _round_up(w, div))
                    for batch in batcher.add(rec.index, key, rec):
                        run(batch)
                for batch in batcher.rest():
                    run(batch)
                for f in ahead:
                    f.cancel()
            put(_DONE)
        except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
            put(e)

    th = threading.Thread(target=model_thread, name="flaxdet-model", daemon=True)
    th.start()
    waiting, nxt = {}, 0
    try:
        while True:
            msg = results.get()
            if msg is _DONE:
                break
            if isinstance(msg, BaseException):
                while nxt in waiting:  # what came before the failure
                    yield waiting.pop(nxt)
                    nxt += 1
                raise msg
            for r in msg:
                waiting[r.index] = r
            while nxt in waiting:
                yield waiting.pop(nxt)
                nxt += 1
    finally:
        stop.set()
        th.join(timeout=60)
