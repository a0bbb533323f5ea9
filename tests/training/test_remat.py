"""Rematerialisation of the train step (``--remat none|auto|full``, issue 18 item 1) changes memory and time, never
values: the losses, the gradients and the BN statistic updates of the recorded goldens' tiny Mask R-CNN (R18) and
RTMDet with every unit rematerialised equal those without. A rematerialised train-mode BN moves its statistics once
per step (``num_batches_tracked`` + 1, running statistics as without remat), not once more in the backward."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from parity_tests.goldens import GOLDENS

MODES = ("auto", "full")


def _converted(tmp_path_factory, src):
    from parity_tests.goldens import require_goldens

    require_goldens()
    from flaxdet.api import convert
    from flaxdet.checkpoint import load_model_dir

    d = tmp_path_factory.mktemp("remat") / "model"
    convert(src / "checkpoint.pth", d, src / "config.yaml")
    return load_model_dir(d)[0]


@pytest.fixture(scope="module")
def mask_rcnn(tmp_path_factory):
    return _converted(tmp_path_factory, GOLDENS / "mask_rcnn_tiny_r18")


@pytest.fixture(scope="module")
def rtmdet(tmp_path_factory):
    return _converted(tmp_path_factory, GOLDENS / "rtmdet" / "rtmdet_tiny")


def _batch(h=128, w=160, n=2, k=3, seed=0):
    from tests.training.test_mask_rows import _small_batch

    return _small_batch(h, w, n, k, seed)


def _assert_same(a, b, what, rtol=1e-5):
    (la, ga, sa), (lb, gb, sb) = a, b
    assert la.keys() == lb.keys()
    for k in la:
        assert lb[k] == pytest.approx(la[k], rel=1e-6, abs=1e-7), (what, k)
    assert ga.keys() == gb.keys()
    for k in ga:
        scale = max(float(np.abs(ga[k]).max()), 1e-12)
        assert np.abs(ga[k] - gb[k]).max() <= rtol * scale, (what, k)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=1e-6, atol=1e-7, err_msg=f"{what} {k}")


def test_remat_plan():
    """Units: the trainable backbone blocks (frozen stages never), the neck, the heads; ``none`` plans nothing,
    ``full`` every unit; an unknown mode is an error."""
    from flax import nnx

    from flaxdet.config import load_config
    from flaxdet.models import build_detector
    from flaxdet.training.step import remat_plan, remat_units

    two = nnx.eval_shape(lambda: build_detector(load_config(GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml")))
    units = dict(remat_units(two))
    assert "backbone.layer2.0" in units and "neck" in units and "roi_head.mask_head" in units
    assert not any(p.startswith(("backbone.layer1", "backbone.conv1")) for p in units)  # frozen_stages 1
    one = nnx.eval_shape(lambda: build_detector(load_config(GOLDENS / "rtmdet" / "rtmdet_tiny" / "config.yaml")))
    units = dict(remat_units(one))
    assert "backbone.stem.0" in units and "backbone.stage4.2" in units and "bbox_head" in units
    assert remat_plan(one, "none") == ()
    assert [p for p, _ in remat_plan(one, "full")] == [p for p, _ in remat_units(one)]
    with pytest.raises(ValueError, match="remat"):
        remat_plan(one, "some")


@pytest.mark.goldens
def test_remat_mask_rcnn_losses_and_grads_equal(mask_rcnn):
    from flaxdet.training.step import loss_and_grads

    batch, key = _batch(), jax.random.PRNGKey(0)
    ref = loss_and_grads(mask_rcnn, batch, key, with_state=True, remat="none")
    assert np.isfinite(ref[0]["loss"]) and ref[0]["loss_mask"] > 0
    for mode in MODES:
        _assert_same(ref, loss_and_grads(mask_rcnn, batch, key, with_state=True, remat=mode), mode)


@pytest.mark.goldens
def test_remat_rtmdet_losses_grads_and_bn_statistics_equal(rtmdet):
    """RTMDet's BN all train: with every unit rematerialised the statistics still move once per step."""
    from flaxdet.training.step import loss_and_grads, split, state_dict_of

    before = state_dict_of(*split(rtmdet))
    batch, key = _batch(), jax.random.PRNGKey(0)
    ref = loss_and_grads(rtmdet, batch, key, with_state=True, remat="none")
    counts = [k for k in ref[2] if k.endswith("num_batches_tracked")]
    assert counts and all(int(ref[2][k]) == int(before[k]) + 1 for k in counts)
    moved = [k for k in ref[2] if k.endswith("running_mean") and not np.array_equal(ref[2][k], before[k])]
    assert len(moved) == len([k for k in ref[2] if k.endswith("running_mean")])
    for mode in MODES:
        _assert_same(ref, loss_and_grads(rtmdet, batch, key, with_state=True, remat=mode), mode)


@pytest.mark.goldens
def test_remat_train_step_equal(rtmdet):
    """Two TrainState steps (AdamW, BN training) with ``remat="full"`` give the parameters, optimizer state and BN
    statistics of ``remat="none"``."""
    from flaxdet.training.optimizers import make_optimizer
    from flaxdet.training.step import TrainState, split, state_dict_of

    batch, key = _batch(), jax.random.PRNGKey(0)
    out = {}
    for mode in ("none", "full"):
        tx, _ = make_optimizer("rtmdet_adamw", total_steps=10, warmup_iters=0)
        state = TrainState(rtmdet, tx, remat=mode)
        assert bool(state.remat) == (mode != "none")
        for i in range(2):
            state.train_step(batch, jax.random.fold_in(key, i))
        out[mode] = (jax.tree.map(np.asarray, state.params), state.state_dict())
    # AdamW divides by sqrt(v): gradients equal to ~1e-6 relative (the recomputed forward may round in another
    # order) move a parameter by the same lr-sized step up to ~1e-6 absolute (lr 0.004, two steps: up to 8e-3)
    pa, pb = jax.tree_util.tree_leaves(out["none"][0]), jax.tree_util.tree_leaves(out["full"][0])
    for a, b in zip(pa, pb):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    for k, v in out["none"][1].items():
        np.testing.assert_allclose(out["full"][1][k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    before = state_dict_of(*split(rtmdet))
    assert all(int(v) == int(before[k]) + 2 for k, v in out["full"][1].items() if k.endswith("num_batches_tracked"))
