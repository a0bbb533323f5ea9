"""The train-step speed-ups compute what the plain formulation computes.

- ``flaxdet.nn.conv2d``: where its gradients are its own (a custom VJP: weight gradient by shifted
  matmuls, strided input gradient by phases), both equal XLA's transposed convolutions, checked in
  float64 and against float64 in float32.
- ``forward.mask_loss``: the mask branch on the smallest row bucket holding the positives gives the
  loss and gradients of the full Spos rows (visdet's recorded tiny-R18 training step, its samples
  replayed).
- ``TrainState``: a step whose positives overflow its mask rows is void and re-run (the all-rows
  update); frozen parameters (``frozen_stages``) are constants of the step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdet import nn

HI = jax.lax.Precision.HIGHEST

CASES = [  # (N, H, W, Cin, Cout, k, stride, padding, dilation)
    (2, 11, 9, 256, 8, 3, 1, 1, 1),
    (2, 11, 9, 256, 8, 3, 2, 1, 1),
    (1, 12, 12, 256, 4, 3, 1, 2, 2),
    (1, 9, 11, 260, 5, 3, 2, 0, 1),
    (2, 8, 10, 16, 12, 1, 2, 0, 1),
    (2, 7, 7, 32, 6, 1, 1, 0, 1),
    # strided, narrow: input gradient by phases, XLA's weight gradient
    (2, 12, 10, 16, 8, 3, 2, 1, 1),
    (1, 11, 13, 8, 4, 3, 2, 1, 1),
    (1, 13, 9, 6, 4, 7, 2, 3, 1),
    (1, 10, 11, 8, 4, 2, 3, 0, 1),  # kernel narrower than the stride: empty phases
]


def _grads(fn, x, w, args):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.cos(fn(x, w, *args))), (0, 1)))(x, w)


@pytest.mark.parametrize("case", CASES, ids=[f"k{c[5]}s{c[6]}p{c[7]}d{c[8]}c{c[3]}" for c in CASES])
def test_conv_custom_gradients_equal_xla(case):
    n, h, w_, cin, cout, k, s, p, d = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w_, cin))
    w = rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)
    assert nn._custom_vjp(w, (s, s), (d, d), 1)  # the custom-VJP path is the one under test
    args = ((s, s), (p, p), (d, d), 1, HI, None)
    with jax.enable_x64():
        mine = _grads(nn.conv2d, jnp.asarray(x), jnp.asarray(w), args)
        ref = _grads(nn._conv_xla, jnp.asarray(x), jnp.asarray(w), args)
        for a, b in zip(mine, ref):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    f32 = _grads(nn.conv2d, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), args)
    for a, b in zip(f32, ref):  # float32 summation error only
        assert a.dtype == jnp.float32
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 2e-6 * np.abs(np.asarray(b)).max()


def test_conv_bf16_gradients_keep_dtypes():
    """Mixed precision: bf16 operands, float32 output; the weight gradient comes back in the weight's
    dtype (the layer's float32 -> bf16 cast turns it into float32), close to the float32 one."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 10, 10, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 256, 8)) / 48, jnp.float32)

    def loss(x, w, dt):
        y = nn.conv2d(x.astype(dt), w.astype(dt), (1, 1), (1, 1), (1, 1), 1,
                      jax.lax.Precision.DEFAULT if dt == jnp.bfloat16 else HI, jnp.float32)
        assert y.dtype == jnp.float32
        return jnp.sum(y * y)

    gb = jax.grad(loss, (0, 1))(x, w, jnp.bfloat16)
    gf = jax.grad(loss, (0, 1))(x, w, jnp.float32)
    for a, b in zip(gb, gf):
        assert a.dtype == jnp.float32
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 2e-2 * np.abs(np.asarray(b)).max()


@pytest.fixture(scope="module")
def replay():
    from parity_tests.goldens import require_goldens

    require_goldens()
    from flaxdet.config import load_config
    from flaxdet.models.detectors.two_stage import build_detector
    from flaxdet_converters.checkpoint_io import load_checkpoint
    from flaxdet_converters.convert import load_visdet_state_dict
    from parity_tests.goldens import GOLDENS
    from parity_tests.train_golden import build_batch_and_injection, load_train_golden

    z, _ = load_train_golden()
    model = build_detector(load_config(GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml"))
    load_visdet_state_dict(model, load_checkpoint(GOLDENS / "mask_rcnn_tiny_r18" / "state_dict.pth").state_dict)
    batch, inject = build_batch_and_injection(model, z)
    return model, batch, inject


def _loss_and_grads_rows(model, batch, key, inject, rows):
    """loss_and_grads with the mask branch on ``rows`` rows per image (None: all Spos)."""
    from flaxdet.training import forward, step

    real = forward.loss_fn

    def with_rows(*a, **k):
        return real(*a, **k, mask_rows=rows)

    orig = step.loss_fn
    step.loss_fn = with_rows
    try:
        return step.loss_and_grads(model, batch, key, inject, with_stages=True)
    finally:
        step.loss_fn = orig


def test_mask_branch_rows_equal_all_rows(replay):
    """The mask branch on the smallest row bucket holding the positives gives the all-rows (Spos)
    loss, stages and mask-head gradients, and says how many rows the positives took (fewer rows:
    see the re-run test below)."""
    from flaxdet.models.roi_heads.standard_roi_head import mask_rows_for_count
    from flaxdet.training.step import mask_row_buckets

    model, batch, inject = replay
    key = jax.random.PRNGKey(0)
    logs_all, grads_all, st_all = _loss_and_grads_rows(model, batch, key, inject, None)
    spos = np.asarray(st_all["mask_valid"]).reshape(2, -1)
    need = max(int(np.nonzero(r)[0].max()) + 1 for r in spos if r.any())
    buckets = mask_row_buckets(model)
    rows = mask_rows_for_count(spos.shape[1], need)
    assert rows < buckets[-1], (need, buckets)  # a smaller bucket than Spos holds the positives here
    logs, grads, st = _loss_and_grads_rows(model, batch, key, inject, rows)
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
    from flaxdet.training.forward import pad_ground_truth

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


def test_train_step_reruns_when_positives_overflow_and_freezes(replay):
    """TrainState picks its rows from the positives of recent steps; a step whose positives need
    more rows changes nothing and is re-run with the bucket holding them -- the same update as a
    step run on all Spos rows. Frozen parameters (``frozen_stages``) stay put, the rest move."""
    from flaxdet.training.loop import make_optimizer
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
    frozen = [".".join(_path_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params0) if state.frozen(p) == 0.0]
    assert frozen and any(k.startswith("backbone.conv1") for k in frozen)
    assert all(np.array_equal(before[k], after[k]) for k in frozen)
    moved = [k for k in before if k not in frozen and not np.array_equal(before[k], after[k])]
    assert any(k.startswith("backbone.layer4") for k in moved) and any(k.startswith("roi_head.mask_head") for k in moved)
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
    from flaxdet.models.detectors.two_stage import build_detector
    from flaxdet.training.loop import make_optimizer
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
