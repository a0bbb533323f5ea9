"""The grain training pipeline (flaxdet.data.grain_pipeline): the thread loader's batches where every image reads,
independent of the worker count, resumable from its saved state, sharded per process, unreadable images skipped and
counted; the evaluation inputs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from flaxdet.data.synthetic import make_synthetic_coco

pytest.importorskip("grain")

SCALE = (160, 128)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from flaxdet.data.coco import CocoDataset

    d = tmp_path_factory.mktemp("grain")
    # both orientations, so buckets differ between steps and some images are fitted into the other orientation
    ann = make_synthetic_coco(d / "data", num_images=10, seed=3, min_size=(96, 96), max_size=(160, 160))
    return CocoDataset(ann)


def _equal(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("masks", [True, False], ids=["masks", "boxes"])
def test_batches_equal_the_thread_loader(ds, masks):
    """Same permutation per (seed, epoch), same flips, same transforms, same padding: across three epochs."""
    from flaxdet.data.coco import TrainLoader
    from flaxdet.data.grain_pipeline import GrainTrainLoader

    ref = TrainLoader(ds, 4, SCALE, max_gt=8, seed=1, with_masks=masks)
    gl = GrainTrainLoader(ds, 4, SCALE, max_gt=8, seed=1, with_masks=masks, workers=0, num_steps=6)
    it = gl.iterator(0)
    try:
        got = list(it)
    finally:
        it.close()
    assert [g[0] for g in got] == list(range(6)) and [g[2] for g in got] == [0, 0, 1, 1, 2, 2]
    shapes = set()
    for step, batch, epoch, skipped, unreadable in got:
        want, want_epoch = ref.make_batch(step)
        assert epoch == want_epoch and skipped == 0 and unreadable == ()
        _equal(want, batch)
        shapes.add(batch["images"].shape)
    assert len(shapes) == 2, shapes  # both buckets met
    if masks:
        assert any(b["gt_masks"].any() for _, b, *_ in got)


def test_workers_and_resume_from_saved_state(ds):
    """Two worker processes give the in-process batches; an iterator restored from the state saved after step 2
    continues at step 3, with the same worker count (grain's own state) or another (rebuilt at the saved step)."""
    from flaxdet.data.grain_pipeline import GrainTrainLoader

    def run(workers, n, state=None):
        it = GrainTrainLoader(ds, 2, SCALE, max_gt=8, seed=1, workers=workers, num_steps=8).iterator(0)
        try:
            if state is not None:
                it.set_state(state)
            got = [next(it) for _ in range(n)]
            return got, it.get_state()
        finally:
            it.close()

    ref, _ = run(0, 8)
    first, state = run(2, 3)
    rest, _ = run(2, 5, state)
    rest0, _ = run(0, 5, state)  # another worker count: rebuilt from the saved step
    for (s, a, *_), (t, b, *_) in zip(ref, first + rest):
        assert s == t
        _equal(a, b)
    assert [r[0] for r in rest0] == [3, 4, 5, 6, 7]
    for (_, a, *_), (_, b, *_) in zip(ref[3:], rest0):
        _equal(a, b)


def test_process_shards_make_the_global_batch(ds):
    """Two processes' rows (row0 0 and 2 of a global batch of 4) are the single process's batch, split."""
    from flaxdet.data.grain_pipeline import GrainTrainLoader

    whole = GrainTrainLoader(ds, 4, SCALE, max_gt=8, seed=2, workers=0)
    parts = [GrainTrainLoader(ds, 4, SCALE, max_gt=8, seed=2, workers=0, process_count=2, row0=r) for r in (0, 2)]
    for step in range(4):
        want = whole.batch(step)
        got = [p.batch(step) for p in parts]
        for k in want:
            if k in ("step", "epoch", "skipped_images", "unreadable"):
                continue
            assert np.array_equal(want[k], np.concatenate([g[k] for g in got])), (step, k)


def test_unreadable_image_gives_its_slot_away(tmp_path):
    """An undecodable image is counted once per epoch; its slot takes a readable image that is not in the same
    step; the batches are the same on every run; the loop's warning names it once."""
    from flaxdet.data.coco import CocoDataset
    from flaxdet.data.grain_pipeline import GrainTrainLoader, warn_unreadable

    ann = make_synthetic_coco(tmp_path / "data", num_images=6, seed=1, min_size=(64, 64), max_size=(96, 96))
    bad = sorted((tmp_path / "data" / "images").iterdir())[2]
    bad.write_bytes(b"\x00garbage")
    ds = CocoDataset(ann)
    bad_index = next(i for i, r in enumerate(ds.records) if r.path == bad)
    runs = []
    for _ in range(2):
        loader = GrainTrainLoader(ds, 2, (96, 64), max_gt=8, seed=0, workers=0)
        out = [loader.batch(s) for s in range(6)]  # two epochs
        assert sum(b["skipped_images"] for b in out) == 2
        for b in out:
            assert bad_index not in b["index"] and len(set(b["index"])) == 2 and b["gt_valid"].any(1).all()
        runs.append(out)
    for a, b in zip(*runs):
        assert np.array_equal(a["images"], b["images"])
    seen = set()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for b in runs[0]:
            warn_unreadable(b["unreadable"], seen)
    assert [bad.name in str(x.message) for x in w] == [True]


def test_eval_inputs_in_order(ds):
    from flaxdet.data.grain_pipeline import eval_inputs
    from flaxdet.data.transforms import load_image, resize_keep_ratio

    got = list(eval_inputs(ds.records[:4], (1333, 800)))
    assert [g[0].image_id for g in got] == [r.image_id for r in ds.records[:4]]
    for rec, img, meta in got:
        want, want_meta = resize_keep_ratio(load_image(rec.path), (1333, 800))
        assert np.array_equal(img, want) and meta == want_meta
