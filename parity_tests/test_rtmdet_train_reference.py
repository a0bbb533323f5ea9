"""reference/ reproduces visdet's recorded RTMDet / RTMDet-Ins training step (``rtmdet/{rtmdet_tiny,
rtmdet_ins_tiny}/train_step.npz``, see the goldens' README "The training step").

Each golden's ``state_dict.pth`` is loaded strictly, the model put in ``train()`` (BN on batch statistics, running
stats updated by torch's BatchNorm), and ``RTMDet.loss`` fed the recorded preprocessed ``input`` (NCHW), metas
(``img_shape``, ``pad_shape``: image 1 is padded to 128x160 inside the 160x192 batch, so its priors beyond are
invalid) and GT (Ins: the crop-size masks, padded by ``loss``); then ``parse_losses`` and ``backward()``.
Checked: head outputs, priors, valid flags, decoded boxes, every assigner output per image (gt_inds, labels,
max_overlaps at the positives, in-GT flags, cost and pairwise-IoU matrices, sampled positives), targets per
level, raw loss sums and avg-factor parts, every loss term (``loss.loss_cls.{l}``, ``loss.loss_bbox.{l}``,
``loss.loss_mask``), the log and total, the recorded gradients and the BN running statistics.

Tolerances: loss terms 1e-6 relative; float intermediates 1e-6 (scale-relative, the cost matrix element-wise
relative: its soft-centre term reaches 1e13); gradients 1e-4 scale-relative (max|d| / max|want|); BN running
stats 1e-6; integers, flags and every discrete decision exact (the goldens' margins: dynamic-k sums >= 0.26 from
an integer, top-k costs >= 0.028 apart). Observed on torch 2.14.1 CPU (the recording's version), one thread:
everything bit-identical (max error 0) for both cases, RTMDet-Ins with the kernel-index bug emulated.

RTMDet-Ins kernel-index bug (visdet ``rtmdet_ins_head.py:589``): the recorded ``loss_mask`` (0.661924) needs
``emulate_kernel_index_bug=True``; the correct indexing gives 0.669815 on this batch (cls/bbox terms unchanged).
A synthetic head-level check (no goldens) shows both modes agree when every prior is valid.

Golden defect: ``bn_before.*`` in train_step.npz equal ``bn_after.*`` (the recorder kept references to the live
buffers, updated in place), so the state before the step is taken from ``state_dict.pth``; ``bn_after.*`` is
right (num_batches_tracked 3 -> 4).

Run with ``-s`` to see the table of measured errors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flaxdet.config import (
    DynamicSoftLabelAssignerCfg,
    MlvlPointGeneratorCfg,
    NormCfg,
    RTMDetInsSepBNHeadCfg,
    RTMDetTrainCfg,
)
from flaxdet.parity import Row, format_table
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_reference import build_detector
from flaxdet_reference.models import load_state_dict_strict
from flaxdet_reference.models.dense_heads.rtmdet_ins_head import RTMDetInsSepBNHead
from flaxdet_reference.models.detectors.two_stage import parse_losses
from parity_tests.goldens import GOLDENS, require_goldens

goldens = pytest.mark.goldens

CASES = ("rtmdet/rtmdet_tiny", "rtmdet/rtmdet_ins_tiny")
LOSS_RTOL = 1e-6
ARRAY_TOL = 1e-6
GRAD_TOL = 1e-4
BN_TOL = 1e-6
N_IMG = 2
LEVELS = range(3)


def a(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def is_ins(case):
    return "ins" in case


def load_step(case):
    require_goldens()
    with np.load(GOLDENS / case / "train_step.npz") as z:
        return {k: z[k] for k in z.files}


def run_step(case, z, emulate=None):
    """Strict load, train(), loss on the recorded batch, backward. -> (model, losses, total, log, stages)."""
    folder = GOLDENS / case
    model = build_detector(folder / "config.yaml")
    load_state_dict_strict(model, load_checkpoint(folder / "state_dict.pth").state_dict)
    model.train()
    metas = [dict(img_shape=tuple(int(v) for v in z[f"meta_img{i}_img_shape"]),
                  pad_shape=tuple(int(v) for v in z[f"meta_img{i}_pad_shape"])) for i in range(N_IMG)]
    gts = [dict(bboxes=z[f"gt_img{i}_bboxes"], labels=z[f"gt_img{i}_labels"],
                **({"masks": z[f"gt_img{i}_masks"]} if is_ins(case) else {})) for i in range(N_IMG)]
    kwargs = {} if emulate is None else dict(emulate_kernel_index_bug=emulate)
    stages = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded
    try:
        losses = model.loss(torch.from_numpy(z["input"]), metas, gts, stages=stages, **kwargs)
        total, log = parse_losses(losses)
        model.zero_grad()
        total.backward()
    finally:
        torch.set_num_threads(threads)
    for i in range(N_IMG):
        if tuple(stages["metas"][i]["batch_input_shape"]) != tuple(int(v) for v in
                                                                   z[f"meta_img{i}_batch_input_shape"]):
            raise AssertionError(f"batch_input_shape {stages['metas'][i]['batch_input_shape']}")
    return model, losses, total, log, stages


_STEPS = {}


def step(case, emulate=None):
    key = (case, emulate)
    if key not in _STEPS:
        z = load_step(case)
        _STEPS[key] = (z, *run_step(case, z, emulate))
    return _STEPS[key]


def recorded_step(case):
    """The step as visdet ran it (Ins: kernel-index bug emulated)."""
    return step(case, True if is_ins(case) else None)


def row(stage, got, want, tol=ARRAY_TOL, elementwise=False):
    """Float: scale-relative max|d| / max(max|want|, 1) (``elementwise``: max of |d| / max(|want|, 1));
    integer / bool: exact."""
    got, want = a(got), np.asarray(want)
    if got.shape != want.shape:
        return Row(stage, want.shape, float("inf"), float("inf"), tol, False, f"shape {got.shape}")
    if want.dtype.kind in "biu":
        bad = int((got != want).sum())
        return Row(stage, want.shape, float(bad), 0.0, 0.0, bad == 0, "exact" + (f": {bad} differ" if bad else ""))
    if want.size == 0:
        return Row(stage, want.shape, 0.0, 0.0, tol, True, "empty")
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    rel = float((d / np.maximum(np.abs(want), 1.0)).max()) if elementwise else float(d.max() / max(np.abs(want).max(),
                                                                                                       1.0))
    return Row(stage, want.shape, float(d.max()), rel, tol, rel <= tol, "element-wise" if elementwise else "")


def check(rows, title):
    print(f"\n{title}\n{format_table(rows)}")
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n" + format_table(rows)


# -- inputs, head outputs, priors ------------------------------------------------------------------------------

@goldens
@pytest.mark.parametrize("case", CASES)
def test_preprocessor_reproduces_recorded_input(case):
    z = load_step(case)
    model = build_detector(GOLDENS / case / "config.yaml")
    imgs = [torch.from_numpy(np.ascontiguousarray(z[f"img{i}_bgr_uint8"])).permute(2, 0, 1).contiguous()
            for i in range(N_IMG)]
    batch, batch_shape = model.data_preprocessor(imgs)
    check([row("input", batch, z["input"], 0.0)], f"{case}: preprocessor")
    assert tuple(batch_shape) == tuple(int(v) for v in z["meta_img0_batch_input_shape"])
    # the uint8 entry point (preprocessor, default img_shape / pad_shape, GT masks padded here) = the recorded step
    load_state_dict_strict(model, load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict)
    gts = [dict(bboxes=z[f"gt_img{i}_bboxes"], labels=z[f"gt_img{i}_labels"],
                **({"masks": z[f"gt_img{i}_masks"]} if is_ins(case) else {})) for i in range(N_IMG)]
    stages = {}
    with torch.no_grad():
        losses = model.train().loss(imgs, [{}, {}], gts, stages=stages,
                                    **(dict(emulate_kernel_index_bug=True) if is_ins(case) else {}))
    for i in range(N_IMG):
        for k in ("img_shape", "pad_shape", "batch_input_shape"):
            assert tuple(stages["metas"][i][k]) == tuple(int(v) for v in z[f"meta_img{i}_{k}"]), (i, k)
    assert float(parse_losses(losses)[0]) == float(z["loss_total"])


@goldens
@pytest.mark.parametrize("case", CASES)
def test_head_outputs_priors_and_valid_flags(case):
    z, _, _, _, _, st = recorded_step(case)
    names = ("cls_scores", "bbox_preds") + (("kernel_preds",) if is_ins(case) else ())
    rows = [row(f"{n}.{lvl}", st[f"{n}.{lvl}"], z[f"{n}.{lvl}"]) for n in names for lvl in LEVELS]
    if is_ins(case):
        rows.append(row("mask_feats", st["mask_feats"], z["mask_feats"]))
    rows.append(row("priors", st["priors"], z["priors"], 0.0))
    rows += [row(f"valid_flags_img{i}", st[f"valid_flags_img{i}"], z[f"valid_flags_img{i}"]) for i in range(N_IMG)]
    rows += [row(f"decoded_bboxes.{lvl}", st[f"decoded_bboxes.{lvl}"], z[f"decoded_bboxes.{lvl}"]) for lvl in LEVELS]
    check(rows, f"{case}: head outputs / priors")
    assert int(z["valid_flags_img1"].sum()) < z["valid_flags_img1"].size  # the case exercises invalid priors


# -- assigner, sampler, targets ---------------------------------------------------------------------------------

@goldens
@pytest.mark.parametrize("case", CASES)
def test_assigner_and_sampler(case):
    z, _, _, _, _, st = recorded_step(case)
    rows = []
    for i in range(N_IMG):
        p = f"assign_img{i}_"
        for k in ("gt_inds", "labels", "in_gts"):
            rows.append(row(p + k, st[p + k], z[p + k]))
        rows.append(row(p + "pred_bboxes", st[p + "pred_bboxes"], z[p + "pred_bboxes"]))
        rows.append(row(p + "pairwise_ious", st[p + "pairwise_ious"], z[p + "pairwise_ious"]))
        rows.append(row(p + "cost", st[p + "cost"], z[p + "cost"], elementwise=True))
        pos = z[p + "gt_inds"] > 0
        rows.append(row(p + "max_overlaps[pos]", a(st[p + "max_overlaps"])[pos], z[p + "max_overlaps"][pos]))
        rows.append(row(p + "max_overlaps[neg]", a(st[p + "max_overlaps"])[~pos], z[p + "max_overlaps"][~pos], 0.0))
        for k in ("pos_inds", "pos_assigned_gt_inds"):
            rows.append(row(f"sample_img{i}_{k}", st[f"sample_img{i}_{k}"], z[f"sample_img{i}_{k}"]))
    check(rows, f"{case}: assigner / sampler")


@goldens
@pytest.mark.parametrize("case", CASES)
def test_targets_per_level(case):
    z, _, _, _, _, st = recorded_step(case)
    rows = [row(f"target_{k}.{lvl}", st[f"target_{k}.{lvl}"], z[f"target_{k}.{lvl}"])
            for lvl in LEVELS for k in ("labels", "label_weights", "bbox_targets", "assign_metrics")]
    check(rows, f"{case}: targets")


# -- losses, gradients, BN --------------------------------------------------------------------------------------

def loss_row(stage, got, want):
    got, want = float(a(got)), float(want)
    rel = abs(got - want) / max(abs(want), 1e-12)
    return Row(stage, (), abs(got - want), rel, LOSS_RTOL, rel <= LOSS_RTOL, f"{got:.7g} vs {want:.7g}")


@goldens
@pytest.mark.parametrize("case", CASES)
def test_loss_terms(case):
    z, _, losses, total, log, st = recorded_step(case)
    rows = []
    for lvl in LEVELS:
        rows += [loss_row(f"loss_raw_{k}.{lvl}", st[f"loss_raw_{k}.{lvl}"], z[f"loss_raw_{k}.{lvl}"])
                 for k in ("cls", "bbox")]
        rows += [loss_row(f"avg_{k}_part.{lvl}", st[f"avg_{k}_part.{lvl}"], z[f"avg_{k}_part.{lvl}"])
                 for k in ("cls", "bbox")]
    rows += [loss_row(k, st[k], z[k]) for k in ("cls_avg_factor", "bbox_avg_factor")]
    rows += [loss_row(f"loss.{k}.{lvl}", losses[k][lvl], z[f"loss.{k}.{lvl}"])
             for k in ("loss_cls", "loss_bbox") for lvl in LEVELS]
    if is_ins(case):
        rows.append(loss_row("loss.loss_mask", losses["loss_mask"], z["loss.loss_mask"]))
        rows += [row(k, st[k], z[k]) for k in ("mask_pos_logits", "mask_pos_kernels", "mask_pos_priors",
                                               "mask_loss_pred_logits", "mask_loss_target")]
        rows.append(loss_row("mask_loss_avg_factor", st["mask_loss_avg_factor"], z["mask_loss_avg_factor"]))
    rows += [loss_row(f"log.{k}", v, z[f"log.{k}"]) for k, v in log.items()]
    assert sorted(f"log.{k}" for k in log) == sorted(k for k in z if k.startswith("log."))
    rows.append(loss_row("loss_total", total, z["loss_total"]))
    check(rows, f"{case}: losses")


@goldens
@pytest.mark.parametrize("case", CASES)
def test_gradients(case):
    z, model, *_ = recorded_step(case)
    params = dict(model.named_parameters(remove_duplicate=False))  # shared head convs under every name
    rows = []
    for k in sorted(k for k in z if k.startswith("grad.")):
        want, grad = z[k], params[k[len("grad."):]].grad
        assert grad is not None, k
        err = float(np.abs(a(grad).astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-12))
        rows.append(Row(k, want.shape, float(np.abs(a(grad) - want).max()), err, GRAD_TOL, err <= GRAD_TOL,
                        "scale-relative"))
    assert len(rows) == (23 if is_ins(case) else 17)
    check(rows, f"{case}: gradients")


@goldens
@pytest.mark.parametrize("case", CASES)
def test_bn_running_stats(case):
    z, model, *_ = recorded_step(case)
    after = model.state_dict()
    before = load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict
    rows = []
    for k in sorted(k for k in z if k.startswith("bn_after.")):
        name = k[len("bn_after."):]
        rows.append(row(k, after[name], z[k], BN_TOL))
        if name.endswith("num_batches_tracked"):
            assert int(after[name]) == int(np.asarray(before[name])) + 1, name
        else:  # batch statistics moved the running stats
            assert not np.array_equal(a(after[name]), np.asarray(before[name])), name
    check(rows, f"{case}: BN running stats")


# -- the kernel-index bug ---------------------------------------------------------------------------------------

@goldens
def test_ins_correct_kernel_indexing_differs_from_visdet():
    case = "rtmdet/rtmdet_ins_tiny"
    z, _, buggy, *_ = recorded_step(case)
    _, _, right, _, _, st = step(case, False)
    got_bug, got_right = float(a(buggy["loss_mask"])), float(a(right["loss_mask"]))
    print(f"\nloss_mask: visdet {float(z['loss.loss_mask']):.7g}, reference emulating the bug {got_bug:.7g}, "
          f"correct indexing {got_right:.7g}")
    assert np.isfinite(got_right)
    assert abs(got_right - got_bug) > 1e-3 * abs(got_bug), (got_right, got_bug)
    # only the kernels change: cls/bbox terms and the positives' priors are the same
    for k in ("loss_cls", "loss_bbox"):
        for lvl in LEVELS:
            assert float(a(right[k][lvl])) == float(a(buggy[k][lvl]))
    np.testing.assert_array_equal(a(st["mask_pos_priors"]), z["mask_pos_priors"])
    # correct mode takes each positive's kernel at its own location
    flat = torch.cat([torch.from_numpy(z[f"kernel_preds.{lvl}"]).permute(0, 2, 3, 1).reshape(N_IMG, -1, 169)
                      for lvl in LEVELS], 1)
    want = [flat[i][torch.nonzero(torch.from_numpy(z[f"valid_flags_img{i}"])).squeeze(1)[
        torch.from_numpy(z[f"sample_img{i}_pos_inds"])]] for i in range(N_IMG)]
    np.testing.assert_array_equal(a(st["mask_pos_kernels"]), a(torch.cat(want)))


def _synthetic_ins_head():
    torch.manual_seed(0)
    bn = NormCfg(type="BN")
    cfg = RTMDetInsSepBNHeadCfg(num_classes=3, in_channels=8, feat_channels=8, norm_cfg=bn,
                                anchor_generator=MlvlPointGeneratorCfg(strides=(8, 16, 32), offset=0),
                                train_cfg=RTMDetTrainCfg(assigner=DynamicSoftLabelAssignerCfg(topk=13)))
    head = RTMDetInsSepBNHead(cfg).train()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


def _synthetic_batch(h=96, w=128):
    g = torch.Generator().manual_seed(1)
    feats = tuple(torch.randn(2, 8, h // s, w // s, generator=g) for s in (8, 16, 32))
    gts = []
    for boxes, labels in (([[8, 10, 70, 80], [60, 30, 120, 90]], [0, 2]), ([[20, 40, 90, 95], [4, 4, 40, 30]], [1, 1])):
        boxes = torch.tensor(boxes, dtype=torch.float32)
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = True
        gts.append(dict(bboxes=boxes, labels=torch.tensor(labels), masks=masks))
    return feats, gts


def test_kernel_index_modes_agree_when_every_prior_is_valid():
    """No goldens: a random RTMDet-Ins head; with every pad_shape = the batch shape both indexings are the same;
    with image 1 padded smaller they differ (its positives below row 0 take another location's kernel)."""
    head = _synthetic_ins_head()
    feats, gts = _synthetic_batch()
    outs = head(feats)

    def mask_loss(pad1, emulate):
        metas = [dict(img_shape=(96, 128), pad_shape=(96, 128)), dict(img_shape=pad1, pad_shape=pad1)]
        st = {}
        loss = head.loss_by_feat(*outs, gts, metas, stages=st, emulate_kernel_index_bug=emulate)["loss_mask"]
        return float(loss.detach()), st

    full_bug, st = mask_loss((96, 128), True)
    full_right, _ = mask_loss((96, 128), False)
    assert st["sample_img1_pos_inds"].numel() > 0 and np.isfinite(full_right)
    assert full_bug == full_right, (full_bug, full_right)
    part_bug, st = mask_loss((64, 96), True)
    part_right, _ = mask_loss((64, 96), False)
    assert int(st["valid_flags_img1"].sum()) < st["valid_flags_img1"].numel()
    assert np.isfinite(part_right) and part_bug != part_right, (part_bug, part_right)
    print(f"\nsynthetic loss_mask: all valid {full_right:.7g} (both modes); image 1 padded 64x96: "
          f"emulated {part_bug:.7g}, correct {part_right:.7g}")
