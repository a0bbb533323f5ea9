"""flaxdet.ops.nms against torchvision.ops.nms / batched_nms (same indices, same order)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxdet import fast_paths
from flaxdet.fast_paths.nms_blocks import nms_blocks
from flaxdet.ops.nms import _nms, _threshold, batched_nms, nms

PAD = 320  # every example is padded to this many boxes (extra rows invalid), so one compile serves many


def _kept(keep, kv):
    keep, kv = np.asarray(keep), np.asarray(kv)
    assert kv[:kv.sum()].all() and (keep[~kv] == 0).all()  # valid slots first, padding holds 0
    return keep[kv]


def _make(n, seed, dtype):
    rng = np.random.default_rng(seed + 1)
    xy = rng.uniform(-20, 200, (PAD, 2))
    wh = rng.uniform(0, rng.choice([5.0, 40.0, 150.0]), (PAD, 2))
    boxes = np.round(np.concatenate([xy, xy + wh], 1), rng.choice([0, 1, 6]))  # coarse grids: exact IoU ties
    zero_w = rng.random(PAD) < 0.1
    boxes[zero_w, 2] = boxes[zero_w, 0]  # degenerate: zero width
    dup = np.nonzero(rng.random(PAD) < 0.1)[0]
    boxes[dup] = boxes[rng.integers(0, PAD, len(dup))]  # identical boxes
    scores = rng.permutation(PAD).astype(dtype) / PAD + rng.uniform(-1, 1)  # distinct scores
    valid = (rng.random(PAD) < 0.85) & (np.arange(PAD) < n)
    return boxes.astype(dtype), scores.astype(dtype), valid


def _torch_nms(boxes, scores, valid, thr):
    idx = np.nonzero(valid)[0]
    k = torchvision.ops.nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]), thr).numpy()
    return idx[k]


nms_jit = jax.jit(nms, static_argnums=(3, 4))


@pytest.fixture(autouse=True, params=["nms_blocks", "none"], ids=["blocks", "plain"])
def nms_path(request):
    """Every test here runs with the ``nms_blocks`` fast path and with the plain NMS."""
    with fast_paths.use([] if request.param == "none" else [request.param]):
        yield request.param


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 300), seed=st.integers(0, 2 ** 31 - 1), thr=st.floats(0.1, 0.9), f64=st.booleans(),
       block=st.sampled_from([1, 7, 64, 256]), max_output=st.sampled_from([1, 5, 40, PAD]),
       nan_valid=st.booleans())
def test_blocks_equal_plain(nms_path, n, seed, thr, f64, block, max_output, nan_valid):
    """The fast path's kept indices and slots equal the plain loop's, whatever the block size and truncation,
    NaN / infinite scores on valid entries included."""
    if nms_path != "none":
        return  # (one run is enough: both functions are called directly)
    dtype = np.float64 if f64 else np.float32
    with jax.enable_x64(f64):
        boxes, scores, valid = _make(n, seed, dtype)
        if nan_valid:
            scores[::17] = np.nan
            scores[5::23] = -np.inf
        t = _threshold(thr, np.dtype(dtype))
        args = (jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid), t)
        a = _nms(*args, max_output)
        b = nms_blocks(*args, max_output, block=block)
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 300), seed=st.integers(0, 2 ** 31 - 1), thr=st.floats(0.1, 0.9),
       f64=st.booleans())
def test_nms_matches_torchvision(n, seed, thr, f64):
    dtype = np.float64 if f64 else np.float32
    with jax.enable_x64(f64):
        boxes, scores, valid = _make(n, seed, dtype)
        scores[~valid] = np.where(np.arange(PAD)[~valid] % 2, np.inf, np.nan)  # ignored, whatever they hold
        keep, kv = nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid), thr, PAD)
        assert np.asarray(keep).dtype == np.int32
        np.testing.assert_array_equal(_kept(keep, kv), _torch_nms(boxes, scores, valid, thr))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 300), seed=st.integers(0, 2 ** 31 - 1), thr=st.floats(0.1, 0.9),
       f64=st.booleans(), n_cls=st.integers(1, 80))
def test_batched_nms_matches_offset_trick(n, seed, thr, f64, n_cls):
    dtype = np.float64 if f64 else np.float32
    with jax.enable_x64(f64):
        boxes, scores, valid = _make(n, seed, dtype)
        idxs = np.random.default_rng(seed).integers(0, n_cls, PAD)
        boxes[~valid] *= 50  # invalid rows must not enter the max coordinate
        keep, kv = batched_nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(idxs), jnp.asarray(valid),
                               thr, PAD)
        if not valid.any():
            assert not bool(kv.any())
            return
        tb, ti = torch.from_numpy(boxes[valid]), torch.from_numpy(idxs[valid])
        offsets = ti.to(tb) * (tb.max() + torch.tensor(1).to(tb))  # visdet / torchvision coordinate trick
        k = torchvision.ops.nms(tb + offsets[:, None], torch.from_numpy(scores[valid]), thr).numpy()
        ref = np.nonzero(valid)[0][k]
        np.testing.assert_array_equal(_kept(keep, kv), ref)
        k2 = torchvision.ops.batched_nms(tb, torch.from_numpy(scores[valid]), ti, thr).numpy()
        np.testing.assert_array_equal(_kept(keep, kv), np.nonzero(valid)[0][k2])


def test_iou_exactly_at_threshold_is_kept():
    boxes = jnp.array([[0, 0, 2, 1], [0, 0, 1, 1], [10, 10, 11, 11]], jnp.float32)  # IoU(0, 1) = 0.5 exactly
    scores = jnp.array([0.9, 0.8, 0.7])
    valid = jnp.ones(3, bool)
    keep, kv = nms(boxes, scores, valid, 0.5, 3)
    assert _kept(keep, kv).tolist() == [0, 1, 2]
    keep, kv = nms(boxes, scores, valid, 0.49, 3)
    assert _kept(keep, kv).tolist() == [0, 2]
    ref = torchvision.ops.nms(torch.tensor(np.asarray(boxes)), torch.tensor(np.asarray(scores)), 0.5)
    assert ref.tolist() == [0, 1, 2]


@pytest.mark.parametrize("k", [1, 3, 7, 9])
def test_threshold_compared_in_double(k):
    # IoU([0,0,k,1], [0,0,10,1]) = k / 10 computed exactly and rounded once: equals float32(thr) for
    # thr = k / 10. torchvision compares in double, so it suppresses iff float32(thr) > thr (k = 1, 3).
    thr = k / 10
    boxes = np.array([[0, 0, k, 1], [0, 0, 10, 1]], np.float32)
    keep, kv = nms(jnp.asarray(boxes), jnp.array([0.9, 0.8]), jnp.ones(2, bool), thr, 2)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.tensor([0.9, 0.8]), thr).tolist()
    assert _kept(keep, kv).tolist() == ref == ([0] if float(np.float32(thr)) > thr else [0, 1])


def test_scores_ignored_for_invalid_and_neg_inf_valid():
    boxes = jnp.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 10, 10]], jnp.float32)
    scores = jnp.array([-jnp.inf, jnp.nan, 0.5, jnp.inf])
    valid = jnp.array([True, False, True, False])
    keep, kv = nms(boxes, scores, valid, 0.5, 4)
    assert _kept(keep, kv).tolist() == [2, 0]


def test_jit_two_sizes_and_truncation():
    rng = np.random.default_rng(0)
    for n in (7, 130):
        xy = rng.uniform(0, 500, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], 1).astype(np.float32)
        scores = rng.permutation(n).astype(np.float32)
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
        keep, kv = nms_jit(jnp.asarray(boxes), jnp.asarray(scores), jnp.ones(n, bool), 0.5, n)
        np.testing.assert_array_equal(_kept(keep, kv), ref)
        m = max(len(ref) - 3, 1)
        keep, kv = nms_jit(jnp.asarray(boxes), jnp.asarray(scores), jnp.ones(n, bool), 0.5, m)
        assert keep.shape == (m,) and bool(kv.all())
        np.testing.assert_array_equal(np.asarray(keep), ref[:m])
    keep, kv = nms_jit(jnp.zeros((4, 4)), jnp.zeros(4), jnp.zeros(4, bool), 0.5, 3)
    assert not bool(kv.any()) and (np.asarray(keep) == 0).all()


@pytest.mark.parametrize("thr", [0.5, 0.7])
def test_batched_nms_under_jit(thr):
    fn = jax.jit(batched_nms, static_argnums=(4, 5))
    for seed in range(10):
        boxes, scores, valid = _make(300, seed, np.float32)
        idxs = np.random.default_rng(seed).integers(0, 80, PAD)
        keep, kv = fn(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(idxs), jnp.asarray(valid), thr, 100)
        ref = torchvision.ops.batched_nms(torch.from_numpy(boxes[valid]), torch.from_numpy(scores[valid]),
                                          torch.from_numpy(idxs[valid]), thr).numpy()[:100]
        np.testing.assert_array_equal(_kept(keep, kv), np.nonzero(valid)[0][ref])
