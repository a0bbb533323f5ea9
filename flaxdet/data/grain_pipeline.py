"""The training and evaluation input pipelines on `grain <https://github.com/google/grain>`_.

Training (:class:`GrainTrainLoader`): visdet's train pipeline as grain transforms over a random-access COCO source,
run in worker processes::

    MapDataset.range(steps x local batch)    # a sample slot of the run: (step, slot in the global batch)
      .map(SampleOrder)    # -> record index (epoch permutation of (seed, epoch)), flip, the step's shape bucket
      .map(Decode)         # OpenCV decode; an unreadable image gives its slot to a substitute (see below)
      .map(ResizeWithGT)   # keep-ratio resize to ``scale``, GT boxes and masks with the image
      .map(Flip)           # horizontal flip where SampleOrder drew it
      .batch(local batch, batch_fn=PadToBucket)  # fit to the step's bucket, pad images and GT to max_gt
      .to_iter_dataset()
      .mp_prefetch(workers)                       # whole batches per worker process

Every element is a pure function of its index, so the batches depend only on (seed, epoch, step) -- not on the
worker count -- and equal :class:`flaxdet.data.coco.TrainLoader`'s wherever no image is unreadable (same epoch
permutation, same flips; the bucket is taken from the first slot's annotated size, which is the decoded size
when the annotation is right). The per-sample transforms are the functions that loader runs
(:func:`~flaxdet.data.coco.decode_train_image`, :func:`~flaxdet.data.coco.resize_train_sample`,
:func:`~flaxdet.data.coco.flip_train_sample`, :func:`~flaxdet.data.coco.collate`).

Per-process sharding: with P processes (``jax.process_count()``), each builds its ``batch_size / P`` rows of the
global batch (the rows its devices hold, ``row0`` onwards), and the train loop assembles the global array with
``jax.make_array_from_process_local_data``.

Unreadable images: the slot of an image that cannot be decoded takes the image ``batch_size`` places later in the
epoch's order (then ``2 x batch_size``, ...; never one of the same step's nominal images), so no process or worker
needs to know what another decoded; the step counts it (``skipped_images``) and the loop warns once per file.

Resuming: :class:`TrainIterator` is checkpointable with ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``
in the run's orbax checkpoints (one JSON per process: grain's iterator state, the step it is at, the worker count).
A restored iterator continues exactly where the saved one stopped; with another worker count (grain's state is
per worker) it is rebuilt at the saved step, which gives the same batches.

Evaluation (:func:`eval_inputs`): decode + visdet's test resize of each record, in order, prefetched by grain.
"""
from __future__ import annotations

import json
import os
import warnings

import cv2
import numpy as np

from flaxdet.data.coco import (
    CocoDataset,
    DatasetError,
    bucket_for,
    collate,
    decode_train_image,
    fit_to_bucket,
    flip_train_sample,
    resize_train_sample,
)
from flaxdet.data.transforms import ImageError, rescale_size


def _grain():
    try:
        import grain
    except ImportError as e:  # a dependency: only a broken install gets here
        raise ImportError("the grain loader needs the `grain` package (pip install grain), or use "
                          "--loader thread") from e
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags (defaults here); not an absl program: none parsed
        flags.FLAGS.mark_as_parsed()
    return grain


def default_workers() -> int:
    """Worker processes for the grain loader: the usable cores less one for the training process, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores - 1))


def _one_thread(grain):
    """A worker's read options: one thread making one element ahead (the worker's queue buffers the rest)."""
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)


def _worker_init(*_):
    """grain worker init: one OpenCV thread per worker process (the workers are the parallelism), and a watchdog
    ending the worker when the training process is gone (a SIGKILLed run leaves no orphan workers behind)."""
    import threading
    import time

    cv2.setNumThreads(1)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="flaxdet-parent-watch").start()


class CocoSource:
    """Random-access COCO source (grain's ``RandomAccessDataSource``): record ``i`` of a :class:`CocoDataset` --
    image path, size, GT boxes, labels and the raw annotations for masks -- without the annotation file's JSON, so
    it pickles to the workers cheaply."""

    def __init__(self, ds: CocoDataset):
        self.records = list(ds.records)
        self.ann_file = ds.ann_file

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[int(i)]

    masks = CocoDataset.masks  # (k, H, W) uint8 of a record's annotations: polygons, RLE, or the box


def epoch_permutation(seed, epoch, n):
    """The record order of ``epoch``: the same permutation :class:`flaxdet.data.coco.TrainLoader` uses."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class _Transform:
    """A grain map transform: grain calls it (``map`` names what it does)."""

    def __call__(self, el):
        return self.map(el)


class SampleOrder(_Transform):
    """grain ``MapTransform`` from a process-local sample slot ``m`` to what the pipeline needs about it: the global
    step ``m // local_batch``, its slot in the global batch, the epoch, the record index (epoch permutation of
    (seed, epoch)), the flip (the slot's draw of ``default_rng([seed, 1, step])``) and the step's shape bucket (the
    first slot's record's annotated size decides, so every process and worker agrees without decoding)."""

    def __init__(self, source: CocoSource, batch_size, local_batch, row0, scale, seed, flip_prob):
        self.records, self.batch_size, self.local_batch, self.row0 = source.records, batch_size, local_batch, row0
        self.scale, self.seed, self.flip_prob = tuple(scale), seed, flip_prob
        self.steps_per_epoch = max(1, len(self.records) // batch_size)
        self._perms = {}

    def perm(self, epoch):
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = epoch_permutation(self.seed, epoch, len(self.records))
        return self._perms[epoch]

    def map(self, m):
        step, j = divmod(int(m), self.local_batch)
        slot = self.row0 + j
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.perm(epoch)
        pos = (k * self.batch_size + slot) % len(perm)
        flip = bool(np.random.default_rng([self.seed, 1, step]).uniform(size=self.batch_size)[slot] < self.flip_prob)
        first = self.records[perm[(k * self.batch_size) % len(perm)]]
        nw, nh = rescale_size(first.width, first.height, self.scale)
        return dict(step=step, slot=slot, epoch=epoch, pos=pos, index=int(perm[pos]), flip=flip,
                    bucket=bucket_for((nh, nw), self.scale), batch_pos=(k * self.batch_size) % len(perm))


class Decode(_Transform):
    """grain ``MapTransform``: decode the slot's image (OpenCV, BGR). An unreadable image (not decodable, or gone)
    hands the slot to the image ``batch_size`` places later in the epoch's order (then ``2 x batch_size``, ...,
    skipping the step's own images): ``skipped`` counts the slot's own image, ``unreadable`` lists every
    (path, reason) met, for the train loop to warn about once."""

    def __init__(self, source: CocoSource, order: SampleOrder):
        self.source, self.order = source, order
        self._bad: dict[int, str] = {}  # record index -> reason (per worker process)

    def _try(self, index):
        if index in self._bad:
            return None, self._bad[index]
        try:
            return decode_train_image(self.source[index]), None
        except ImageError as e:
            self._bad[index] = str(e)
            return None, str(e)

    def map(self, el):
        img, reason = self._try(el["index"])
        unreadable, skipped = [], 0
        if img is None:
            skipped = 1
            unreadable.append((str(self.source[el["index"]].path), reason))
            perm, n, b = self.order.perm(el["epoch"]), len(self.source), self.order.batch_size
            own = {(el["batch_pos"] + i) % n for i in range(b)}
            for t in range(1, n + 1):
                pos = (el["pos"] + t * b) % n
                if pos in own:
                    continue
                img, reason = self._try(int(perm[pos]))
                if img is not None:
                    el = dict(el, index=int(perm[pos]))
                    break
                unreadable.append((str(self.source[int(perm[pos])].path), reason))
            if img is None:
                raise DatasetError(f"{self.source.ann_file}: no readable image left to fill a batch "
                                   f"(unreadable: {len(self._bad)} of {n})")
        return dict(el, img=img, skipped=skipped, unreadable=tuple(unreadable))


class ResizeWithGT(_Transform):
    """grain ``MapTransform``: visdet's keep-ratio ``Resize`` to ``scale`` with the GT boxes and (``with_masks``)
    the decoded masks (:func:`flaxdet.data.coco.resize_train_sample`)."""

    def __init__(self, source: CocoSource, scale, with_masks):
        self.source, self.scale, self.with_masks = source, tuple(scale), with_masks

    def map(self, el):
        img, gt, meta = resize_train_sample(self.source, self.source[el["index"]], el.pop("img"), self.scale,
                                            self.with_masks)
        return dict(el, sample=(img, gt, meta))


class Flip(_Transform):
    """grain ``MapTransform``: visdet's horizontal ``RandomFlip`` where the slot drew it (deterministic per
    (seed, step, slot); :func:`flaxdet.data.coco.flip_train_sample`)."""

    def map(self, el):
        return dict(el, sample=flip_train_sample(*el["sample"])) if el["flip"] else el


class PadToBucket:
    """grain batch function: the process's slots of one step -> a batch (images padded to the step's bucket, GT
    padded to ``max_gt``; :func:`flaxdet.data.coco.collate`). GT masks travel unpadded (``gt_masks_list``) and are
    padded by :func:`expand_masks` in the training process: a padded (B, max_gt, H, W) block is mostly zeros."""

    def __init__(self, max_gt, with_masks):
        self.max_gt, self.with_masks = max_gt, with_masks

    def __call__(self, els):
        steps = {el["step"] for el in els}
        assert len(steps) == 1, f"a batch spans steps {steps}"
        bucket = els[0]["bucket"]
        samples = fit_to_bucket([el["sample"] for el in els], bucket)
        masks = [s[1]["masks"] for s in samples]
        samples = [(img, dict(gt, masks=None), meta) for img, gt, meta in samples]
        batch = collate(samples, bucket, self.max_gt)
        del batch["gt_masks"]  # never touched (calloc'd) zeros: not sent between processes
        if self.with_masks:
            batch["gt_masks_list"] = tuple(m[: self.max_gt] for m in masks)
        batch.update(step=els[0]["step"], epoch=els[0]["epoch"], skipped_images=sum(el["skipped"] for el in els),
                     unreadable=tuple(u for el in els for u in el["unreadable"]),
                     index=np.array([el["index"] for el in els], np.int64))
        return batch


def expand_masks(batch, max_gt):
    """``gt_masks`` (B, max_gt, Hp, Wp) uint8 from the batch's unpadded ``gt_masks_list`` (zeros without masks)."""
    n, hp, wp = batch["images"].shape[:3]
    out = np.zeros((n, max_gt, hp, wp), np.uint8)
    for i, m in enumerate(batch.pop("gt_masks_list", ())):
        out[i, : len(m), : m.shape[1], : m.shape[2]] = m
    batch["gt_masks"] = out
    return batch


class GrainTrainLoader:
    """The training batches of a run on grain (see the module doc). ``batch_size`` is the global batch; this
    process builds rows ``row0 .. row0 + batch_size / process_count`` of it. ``iterator(start_step)`` gives a
    :class:`TrainIterator` (checkpointable in orbax)."""

    def __init__(self, ds: CocoDataset, batch_size, scale, max_gt=100, seed=0, flip_prob=0.5, with_masks=True,
                 workers=None, num_steps=None, process_count=1, row0=0, prefetch=2):
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        self.source = CocoSource(ds)
        self.batch_size, self.scale, self.max_gt, self.seed = batch_size, tuple(scale), max_gt, seed
        self.flip_prob, self.with_masks, self.prefetch = flip_prob, with_masks, prefetch
        self.workers = default_workers() if workers is None else int(workers)
        self.local_batch, self.row0 = batch_size // process_count, row0
        self.steps_per_epoch = max(1, len(ds) // batch_size)
        self.num_steps = num_steps

    def dataset(self, origin=0):
        """The grain pipeline from step ``origin`` (an ``IterDataset`` of batches)."""
        grain = _grain()
        order = SampleOrder(self.source, self.batch_size, self.local_batch, self.row0, self.scale, self.seed,
                            self.flip_prob)
        n = (self.num_steps if self.num_steps is not None else 1 << 40) * self.local_batch
        ds = (grain.MapDataset.range(n).map(order).map(Decode(self.source, order))
              .map(ResizeWithGT(self.source, self.scale, self.with_masks)).map(Flip())
              .batch(self.local_batch, drop_remainder=True, batch_fn=PadToBucket(self.max_gt, self.with_masks)))
        if origin:
            ds = ds[origin:]
        if self.workers > 0:  # one thread per worker (grain's default: 16 threads and 500 elements buffered each)
            return ds.to_iter_dataset(_one_thread(grain)).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=self.prefetch),
                worker_init_fn=_worker_init)
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch))

    def iterator(self, start_step=0):
        return TrainIterator(self, start_step)

    def batch_in_worker(self, step):
        """What a worker makes of step ``step`` (this process's rows; GT masks unpadded), in this process."""
        order = SampleOrder(self.source, self.batch_size, self.local_batch, self.row0, self.scale, self.seed,
                            self.flip_prob)
        dec, res = Decode(self.source, order), ResizeWithGT(self.source, self.scale, self.with_masks)
        els = [Flip().map(res.map(dec.map(order.map(step * self.local_batch + j)))) for j in range(self.local_batch)]
        return PadToBucket(self.max_gt, self.with_masks)(els)

    def batch(self, step):
        """Step ``step``'s batch (this process's rows), in this process: for tests and inspection."""
        return expand_masks(self.batch_in_worker(step), self.max_gt)


class TrainIterator:
    """Batches from a step on: ``next()`` gives (step, batch, epoch, skipped_images, unreadable); the batch holds
    the arrays the train step takes. Checkpointable with grain's orbax handler (``get_state`` / ``set_state``
    bytes: grain's iterator state, the step, the pipeline's origin and the worker count)."""

    def __init__(self, loader: GrainTrainLoader, start_step=0):
        self.loader, self.next_step, self.origin = loader, int(start_step), int(start_step)
        self._it = None
        self._grain_state = None

    def _start(self):
        if self._it is None:
            self._it = iter(self.loader.dataset(self.origin))
            if self._grain_state is not None:
                self._it.set_state(self._grain_state)

    def start_prefetch(self):  # grain's orbax handler calls it after set_state
        self._start()

    def __iter__(self):
        return self

    def __next__(self):
        self._start()
        batch = next(self._it)
        step = int(batch.pop("step"))
        if step != self.next_step:
            raise RuntimeError(f"the data pipeline is at step {step}, the run at {self.next_step}: its restored "
                               "state does not belong to this run")
        self.next_step += 1
        epoch, skipped, unreadable = int(batch.pop("epoch")), int(batch.pop("skipped_images")), batch.pop("unreadable")
        batch.pop("index")
        return step, expand_masks(batch, self.loader.max_gt), epoch, skipped, unreadable

    def get_state(self) -> bytes:
        self._start()
        return json.dumps(dict(next_step=self.next_step, origin=self.origin, workers=self.loader.workers,
                               grain=self._it.get_state()), indent=1).encode()

    def set_state(self, state: bytes):
        st = json.loads(state.decode() if isinstance(state, bytes) else state)
        self.close()
        self.next_step = int(st["next_step"])
        if st.get("workers") == self.loader.workers and st.get("grain") is not None:
            self.origin, self._grain_state = int(st["origin"]), st["grain"]
        else:  # grain's state is per worker: rebuild at the saved step (the same batches)
            self.origin, self._grain_state = self.next_step, None

    def close(self):
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None


def warn_unreadable(unreadable, seen: set):
    """Warn once per file about the unreadable images a batch met."""
    for path, reason in unreadable:
        if path not in seen:
            seen.add(path)
            warnings.warn(f"{reason}: skipped (training continues without it)", stacklevel=2)


def eval_inputs(records, scale, workers=0, prefetch=4):
    """(record, resized image, meta) for each of ``records`` in order: OpenCV decode and visdet's keep-ratio test
    resize, prefetched by grain (``workers`` processes; 0: a thread in this process)."""
    from flaxdet.data.transforms import load_image, resize_keep_ratio

    grain = _grain()
    scale = tuple(scale)
    ds = grain.MapDataset.source(list(records)).map(lambda r: (r, *resize_keep_ratio(load_image(r.path), scale)))
    if workers > 0:
        it = ds.to_iter_dataset(_one_thread(grain)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_worker_init)
    else:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    yield from it
