"""RTMDet / RTMDet-Ins training parity: flaxdet's one training step equals visdet's recorded one
(``goldens/rtmdet/<case>/train_step.npz``): priors and valid flags, the DynamicSoftLabelAssigner's candidates, cost
and IoU matrices and assignments, the per-level targets, every loss term per level and the mask loss, a dozen
parameter gradients and the BN running statistics after the step (every BN in train mode, as visdet trains RTMDet).

visdet's mask loss takes the positives' kernels by an index into the wrong list when an image's pad_shape is
smaller than the batch (visdet-rtmdet.md section 4.5): the recording has that (image 2 pads to 128x160 in a
160x192 batch). flaxdet indexes correctly; ``emulate_kernel_index_bug`` replays visdet's numbers for this check.
Tolerances: ``flaxdet.parity.TOLERANCES`` (``rtmdet.train.*``, ``train.grad``).
"""
from __future__ import annotations

import numpy as np
import pytest

from flaxdet.parity import TOLERANCES
from flaxdet_converters.checkpoint_io import load_checkpoint
from parity_tests.goldens import GOLDENS
from parity_tests.rtmdet_train_golden import CASES, replay

pytestmark = pytest.mark.goldens


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("case", CASES)
def test_loss_terms(case):
    z, logs, st, _, _ = replay(case)
    tol = TOLERANCES["rtmdet.train.loss"].rtol
    errs = {}
    for name in ("loss_cls", "loss_bbox"):
        for lvl in range(3):
            errs[f"{name}.{lvl}"] = rel(float(st[f"{name}.{lvl}"]), float(z[f"loss.{name}.{lvl}"]))
    if "loss.loss_mask" in z.files:
        errs["loss_mask"] = rel(logs["loss_mask"], float(z["loss.loss_mask"]))
    for k in ("loss", "loss_cls", "loss_bbox"):
        errs[f"log.{k}"] = rel(logs[k], float(z[f"log.{k}"]))
    assert max(errs.values()) <= tol, errs
    # the normaliser: the IoU sum of the positives over the batch
    assert rel(float(st["avg_factor"]), float(z["cls_avg_factor"])) <= tol


@pytest.mark.parametrize("case", CASES)
def test_assigner_and_targets(case):
    z, _, st, _, _ = replay(case)
    np.testing.assert_array_equal(np.asarray(st["priors"]), z["priors"])
    a = st["assign"]
    for i in range(2):
        v = z[f"valid_flags_img{i}"]
        np.testing.assert_array_equal(st["valid"][i], v)
        np.testing.assert_array_equal(a["in_gts"][i][v], z[f"assign_img{i}_in_gts"])
        gi = a["gt_inds"][i][v]
        np.testing.assert_array_equal(gi, z[f"assign_img{i}_gt_inds"])
        np.testing.assert_array_equal(a["labels"][i][v], z[f"assign_img{i}_labels"])
        pos = gi > 0
        np.testing.assert_allclose(a["max_overlaps"][i][v][pos], z[f"assign_img{i}_max_overlaps"][pos], atol=1e-5)
        ing = z[f"assign_img{i}_in_gts"]
        g = z[f"assign_img{i}_cost"].shape[1]
        cost, want = a["cost"][i][v][ing][:, :g], z[f"assign_img{i}_cost"]
        assert np.max(np.abs(cost - want) / np.abs(want)) <= TOLERANCES["rtmdet.train.cost"].rtol  # up to 1e15
        np.testing.assert_allclose(a["ious"][i][v][ing][:, :g], z[f"assign_img{i}_pairwise_ious"], atol=1e-5)
        np.testing.assert_array_equal(np.flatnonzero(pos), z[f"sample_img{i}_pos_inds"])
    b = st["bounds"] if "bounds" in st else np.cumsum([0] + [z[f"target_labels.{lvl}"].shape[1] for lvl in range(3)])
    for lvl in range(3):
        sl = slice(int(b[lvl]), int(b[lvl + 1]))
        np.testing.assert_array_equal(st["labels"][:, sl], z[f"target_labels.{lvl}"])
        np.testing.assert_array_equal(st["label_weights"][:, sl], z[f"target_label_weights.{lvl}"])
        np.testing.assert_allclose(st["bbox_targets"][:, sl], z[f"target_bbox_targets.{lvl}"], atol=0)
        np.testing.assert_allclose(st["assign_metrics"][:, sl], z[f"target_assign_metrics.{lvl}"], atol=1e-5)
        np.testing.assert_allclose(st["decoded"][:, sl], z[f"decoded_bboxes.{lvl}"], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("case", CASES)
def test_gradients_and_bn_statistics(case):
    z, _, _, grads, after = replay(case)
    # the recording's bn_before.* were read after the step (they equal bn_after.*): the state before is the
    # checkpoint's
    before = load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict
    tol = TOLERANCES["train.grad"].rtol
    errs = {}
    for key in (k for k in z.files if k.startswith("grad.")):
        name, want = key[len("grad."):], z[key]
        errs[name] = float(np.abs(grads[name] - want).max() / max(np.abs(want).max(), 1e-12))
    assert len(errs) == (23 if "ins" in case else 17)
    assert max(errs.values()) <= tol, errs
    bn_tol = TOLERANCES["rtmdet.train.bn_stats"].rtol
    checked = 0
    for key in (k for k in z.files if k.startswith("bn_after.")):
        name, want = key[len("bn_after."):], z[key]
        if name.endswith("num_batches_tracked"):
            assert int(after[name]) == int(want) == int(before[name]) + 1, name
        else:
            err = np.abs(after[name] - want).max() / max(np.abs(want).max(), 1e-12)
            assert err <= bn_tol, (name, err)
        checked += 1
    assert checked == (30 if "ins" in case else 24)


def test_mask_loss_kernel_index():
    """With the bug emulated the recorded mask loss and positives' kernels are reproduced (above); flaxdet's
    default takes each positive's own kernel, which differs here because image 2's pad_shape is smaller."""
    case = "rtmdet/rtmdet_ins_tiny"
    z, logs_bug, st_bug, _, _ = replay(case, True)
    _, logs, st, _, _ = replay(case, False)
    rows = st_bug["mask_row_valid"].reshape(-1)
    k = st_bug["mask_pos_kernels"].reshape(-1, st_bug["mask_pos_kernels"].shape[-1])[rows]
    assert np.abs(k - z["mask_pos_kernels"]).max() <= 1e-4 * np.abs(z["mask_pos_kernels"]).max()
    assert logs_bug["loss_mask"] == pytest.approx(float(z["loss.loss_mask"]), rel=1e-6)
    assert np.isfinite(logs["loss_mask"]) and abs(logs["loss_mask"] - logs_bug["loss_mask"]) > 1e-4
    # image 1 (pad_shape == batch shape): the same kernels either way; image 2: different ones
    k0 = st["mask_pos_kernels"][0][st["mask_row_valid"][0]]
    np.testing.assert_array_equal(k0, st_bug["mask_pos_kernels"][0][st_bug["mask_row_valid"][0]])
    k1 = st["mask_pos_kernels"][1][st["mask_row_valid"][1]]
    assert np.abs(k1 - st_bug["mask_pos_kernels"][1][st_bug["mask_row_valid"][1]]).max() > 0
    for key in ("loss", "loss_cls", "loss_bbox"):
        assert logs[key] - logs["loss_mask"] * (key == "loss") == pytest.approx(
            logs_bug[key] - logs_bug["loss_mask"] * (key == "loss"), rel=1e-6)
