"""Training parity: flaxdet's loss terms and gradients equal visdet's recorded training step.

visdet's random samplers are replayed by injecting the recorded indices (and its train-mode
proposals), so every loss term is determined. Tolerances (TOLERANCES table): loss terms 1e-5
relative, gradients 1e-3 scale-relative.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from flaxdet.config import load_config
from flaxdet.models import build_detector
from flaxdet.parity import TOLERANCES
from flaxdet.training.step import loss_and_grads
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import load_visdet_state_dict
from parity_tests.goldens import GOLDENS
from parity_tests.train_golden import build_batch_and_injection, load_train_golden

pytestmark = pytest.mark.goldens


@pytest.fixture(scope="module")
def replay():
    z, meta = load_train_golden()
    model = build_detector(load_config(GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml"))
    load_visdet_state_dict(model, load_checkpoint(GOLDENS / "mask_rcnn_tiny_r18" / "state_dict.pth").state_dict)
    batch, inject = build_batch_and_injection(model, z)
    logs, grads, stages = loss_and_grads(model, batch, jax.random.PRNGKey(0), inject, with_stages=True)
    return z, meta, logs, grads, stages


def test_loss_terms(replay):
    z, meta, logs, _, stages = replay
    tol = TOLERANCES["train.loss"].rtol
    for k, want in meta["log_vars"].items():
        assert abs(logs[k] - want) <= tol * max(abs(want), 1e-3), (k, logs[k], want)
    assert int(stages["rpn_avg_factor"]) == int(z["rpn_avg_factor"])
    for name, key in (("loss_rpn_cls", "rpn_per_level_cls"), ("loss_rpn_bbox", "rpn_per_level_bbox")):
        np.testing.assert_allclose(np.asarray(stages[key]), meta["rpn_loss_per_level"][name], rtol=tol, atol=1e-7)


def test_intermediates(replay):
    """Sampled RoIs ([pos; neg] per image), their features and head outputs, mask RoIs and targets."""
    z, _, _, _, st = replay
    rows = np.asarray(st["rcnn_sample_valid"]).reshape(-1)
    np.testing.assert_allclose(np.asarray(st["rcnn_rois"])[rows], z["rcnn_rois"], rtol=0, atol=1e-4)
    feats = np.asarray(st["rcnn_roi_feats"])[rows].transpose(0, 3, 1, 2)
    assert np.abs(feats - z["rcnn_roi_feats"]).max() <= 1e-5 * np.abs(z["rcnn_roi_feats"]).max()
    cls = np.asarray(st["rcnn_cls_score"])[rows]
    assert np.abs(cls - z["rcnn_cls_score"]).max() <= 1e-5 * np.abs(z["rcnn_cls_score"]).max()
    mv = np.asarray(st["mask_valid"])
    np.testing.assert_allclose(np.asarray(st["mask_rois"])[mv], z["mask_rois"], rtol=0, atol=1e-4)
    assert np.array_equal(np.asarray(st["mask_targets"])[mv], z["mask_targets"])


def test_gradients(replay):
    z, _, _, grads, _ = replay
    tol = TOLERANCES["train.grad"].rtol
    checked = 0
    for key in (k for k in z if k.startswith("grad_")):
        name = key[len("grad_"):]
        want = z[key]
        err = np.abs(grads[name] - want).max() / max(np.abs(want).max(), 1e-12)
        assert err <= tol, (name, err)
        checked += 1
    assert checked == 10
