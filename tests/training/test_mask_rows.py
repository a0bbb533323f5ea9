"""Mask-branch row buckets in training compute what the all-rows formulation computes.

- ``mask_loss_by`` (the RoI heads' mask loss): the mask branch on the smallest row bucket holding the
  positives gives the loss and gradients of the full Spos rows (visdet's recorded tiny-R18 training step,
  its samples replayed).
- ``TrainState``: a step whose positives overflow its mask rows is void and re-run (the all-rows
  update); frozen parameters (``frozen_stages``) are constants of the step.
- A Cascade Mask R-CNN picks its rows from the positives of all its stages (slow).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def replay():
    from parity_tests.goldens import require_goldens

    require_goldens()
    from flaxdet.config import load_config
    from flaxdet.models import build_detector
    from flaxdet_converters.checkpoint_io import load_checkpoint
    from flaxdet_converters.convert import load_visdet_state_dict
    from parity_tests.goldens import GOLDENS
    from parity_tests.train_golden import build_batch_and_injection, load_train_golden

    z, _ = load_train_golden()
    model = build_detector(load_config(GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml"))
    load_visdet_state_dict(model, load_checkpoint(GOLDENS / "mask_rcnn_tiny_r18" / "state_dict.pth").state_dict)
    batch, inject = build_batch_and_injection(model, z)
    return model, batch, inject


@pytest.mark.goldens
def test_mask_branch_rows_equal_all_rows(replay):
    """The mask branch on the smallest row bucket holding the positives gives the all-rows (Spos)
    loss, stages and mask-head gradients, and says how many rows the positives took (fewer rows:
    see the re-run test below)."""
    from flaxdet.fast_paths.mask_rows import mask_rows_for_count
    from flaxdet.training.step import loss_and_grads

    model, batch, inject = replay
    key = jax.random.PRNGKey(0)
    logs_all, grads_all, st_all = loss_and_grads(model, batch, key, inject, True, None)
    spos = np.asarray(st_all["mask_valid"]).reshape(2, -1)
    need = max(int(np.nonzero(r)[0].max()) + 1 for r in spos if r.any())
    buckets = model.roi_head.mask_row_buckets()
    rows = mask_rows_for_count(spos.shape[1], need)
    assert rows < buckets[-1], (need, buckets)  # a smaller bucket than Spos holds the positives here
    logs, grads, st = loss_and_grads(model, batch, key, inject, True, rows)
    assert logs["mask_rows_needed"] == need
    assert logs["loss_mask"] == pytest.approx(logs_all["loss_mask"], rel=1e-6)
    assert logs["loss"] == pytest.approx(logs_all["loss"], rel=1e-6)
    mv = np.asarray(st_all["mask_valid"])
    np.testing.assert_array_equal(np.asarray(st["mask_valid"]), mv)
    for name in ("mask_targets", "mask_preds_sel", "mask_roi_feats"):
        np.testing.assert_allclose(np.asarray(st[name])[mv], np.asarray(st_all[name])[mv], rtol=0, atol=1e-5)
    for name in (k for k in grads if k.startswith("roi_head.mask_head")):
        b = grads_all[name]
        assert np.abs(grads[name] - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-12), name
        assert np.abs(b).max() > 0, name  # the mask head is trained by this step


def _small_batch(h=128, w=160, n=2, k=3, seed=0):
    """n random images with k box-shaped GT masks each (labels 0..2), as the train loader pads them."""
    from flaxdet.data.transforms import pad_ground_truth

    rng = np.random.default_rng(seed)
    gts = []
    for _ in range(n):
        x1, y1 = rng.uniform(0, w - 80, k), rng.uniform(0, h - 60, k)
        boxes = np.stack([x1, y1, x1 + rng.uniform(20, 70, k), y1 + rng.uniform(20, 60, k)], 1).astype(np.float32)
        masks = np.zeros((k, h, w), np.uint8)
        for j, (a, b, c, d) in enumerate(boxes.astype(int)):
            masks[j, b:d, a:c] = 1
        gts.append(dict(bboxes=boxes, labels=np.arange(k) % 3, masks=masks))
    batch = dict(images=rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8), img_shapes=np.array([(h, w)] * n, np.int32),
                 pad_shapes=np.array([(h, w)] * n, np.int32))
    batch.update(pad_ground_truth(gts, 8, h, w))
    return {key: jnp.asarray(v) for key, v in batch.items()}


@pytest.mark.goldens
def test_train_step_reruns_when_positives_overflow_and_freezes(replay):
    """TrainState picks its rows from the positives of recent steps; a step whose positives need
    more rows changes nothing and is re-run with the bucket holding them -- the same update as a
    step run on all Spos rows. Frozen parameters (``frozen_stages``) stay put, the rest move."""
    from flaxdet.training.optimizers import make_optimizer
    from flaxdet.training.step import TrainState, _path_names

    model = replay[0]
    batch = _small_batch()
    tx, _ = make_optimizer("sgd", 0.02, 1e-4, steps_per_epoch=10, warmup_iters=0, momentum=0.9)
    state = TrainState(model, tx)
    assert state.mask_rows() == state.mask_buckets[0]  # no step yet: the smallest bucket
    spos = state.mask_buckets[-1]
    params0 = jax.tree.map(jnp.array, state.params)  # own copies: the step donates its buffers
    opt0 = jax.tree.map(jnp.array, state.opt_state)
    key = jax.random.PRNGKey(0)
    state.params = jax.tree.map(jnp.array, params0)
    state.mask_buckets = (spos,)
    state.train_step(batch, key)  # every Spos row: the reference update
    ref = jax.tree.map(np.asarray, state.params)
    need = state.needed_rows[-1]
    assert 2 < need < spos and state.reruns == 0
    names = lambda tree: {".".join(_path_names(p)): np.asarray(v)  # noqa: E731
                          for p, v in jax.tree_util.tree_leaves_with_path(tree)}
    before, after = names(params0), names(ref)
    frozen = [".".join(_path_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params0)
              if state.frozen(p) == 0.0]
    assert frozen and any(k.startswith("backbone.conv1") for k in frozen)
    assert all(np.array_equal(before[k], after[k]) for k in frozen)
    moved = [k for k in before if k not in frozen and not np.array_equal(before[k], after[k])]
    assert any(k.startswith("backbone.layer4") for k in moved)
    assert any(k.startswith("roi_head.mask_head") for k in moved)
    # from the same start, with buckets around the positives, as if recent steps had fewer of them
    state.params, state.opt_state, state.step = jax.tree.map(jnp.array, params0), opt0, 0
    state.mask_buckets, state.needed_rows, state.MASK_ROWS_HEADROOM = (need - 2, spos), [need - 2], 1.0
    assert state.mask_rows() == need - 2
    logs = state.train_step(batch, key)  # overflows, changes nothing, re-runs on Spos (compiled above)
    assert state.reruns == 1 and state.needed_rows[-1] == need and state.last_mask_rows == spos
    assert state.step == 1 and "mask_rows_needed" not in logs
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow
def test_cascade_train_step_picks_mask_rows():
    """A Cascade Mask R-CNN (every stage a mask branch) trains through the row buckets: the buckets
    come from the stages' Spos, the positives of all stages pick the next step's, the update is finite."""
    from flaxdet.models import build_detector
    from flaxdet.training.optimizers import make_optimizer
    from flaxdet.training.step import TrainState
    from parity_tests.test_cascade import small_cascade_cfg

    model = build_detector(small_cascade_cfg(mask=True, classes=5))
    tx, _ = make_optimizer("sgd", 0.01, 1e-4, steps_per_epoch=10, warmup_iters=0, momentum=0.9)
    state = TrainState(model, tx)
    assert state.mask_buckets[-1] == max(
        int(c.sampler.num * c.sampler.pos_fraction) for c in model.roi_head.cfg.train_cfg)
    batch = _small_batch()
    logs = state.train_step(batch, jax.random.PRNGKey(0))
    assert all(np.isfinite(float(v)) for v in logs.values()) and "s2.loss_mask" in logs
    need = state.needed_rows[-1]
    assert 3 <= need <= state.mask_buckets[-1]  # at least the GT boxes (proposals) are positives
    assert state.mask_rows() == next(k for k in state.mask_buckets if k >= need)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
