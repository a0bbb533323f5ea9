"""reference/'s training loss path: it reproduces visdet's recorded training step, and flaxdet's JAX
training forward/backward equals it.

(a) reference/ replays ``train_tiny_r18`` (visdet's sampled indices and train-mode proposals injected):
    loss terms, targets, sampled RoIs, mask targets and the 10 recorded gradients.
(b) flaxdet ``loss_and_grads`` vs reference ``loss`` + ``backward`` on the same weights (converted by the
    production converter), the same images/GT and the same samples -- drawn in reference/ with a torch
    Generator and mapped into flaxdet's layouts (``parity_tests.train_golden.flaxdet_injection``) -- for
    both golden configs, on a batch with a few GTs, no GT and 30 GTs (one duplicated: IoU ties).
    Every loss term and EVERY parameter gradient is compared (frozen-stage parameters too: their
    gradients are computed on both sides for the check, although training never applies them).
(c) the same on hypothesis-drawn small configs (slow).

Tolerances: TOLERANCES["train.loss"] (relative) and ["train.grad"] (scale-relative, max|d|/max|want|).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flaxdet.config import load_config
from flaxdet.models import build_detector as build_flax
from flaxdet.parity import TOLERANCES, compare_detections, format_table
from flaxdet.training.step import loss_and_grads
from flaxdet_converters.convert import load_visdet_state_dict
from flaxdet_reference import build_detector as build_ref
from flaxdet_reference import load_detector
from flaxdet_reference.models.detectors.two_stage import parse_losses
from parity_tests.goldens import GOLDENS, IMAGES, config_path, golden_image, require_goldens
from parity_tests.train_golden import flaxdet_batch, flaxdet_injection, load_train_golden

pytestmark = pytest.mark.goldens

LOSS_TOL = TOLERANCES["train.loss"].rtol
GRAD_TOL = TOLERANCES["train.grad"].rtol
LOG_KEYS = ("loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "acc", "loss_bbox", "loss_mask")
# A ReLU input within float32 noise of 0 can come out with opposite signs in two correct float32
# implementations; the backward mask then differs at that one position. In the 7x10 layer4 map of a
# small input that alone can move a channel's gradient by > 1e-3 of the parameter's scale (observed with
# the golden R18 weights on random-noise images: an input of -9.5e-8 in backbone.layer4.1 (bn1, channel
# 111) came out positive in flaxdet, 1.5e-2 on layer4.1.conv1; with reference/ forced to the same sign
# every gradient agreed within 1.1e-4). Hence (b) first measures how noisy a case's float32 gradients
# are (:func:`gradient_noise`), and a mismatch is still accepted if flipping reference/'s input nearest
# to 0 at ONE ReLU call explains every parameter within tolerance (``reference_step(flip_site=...)``).


def rel_loss_err(got, want):
    return abs(got - want) / max(abs(want), 1e-3)


def scale_err(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


# -- (a) reference/ vs visdet's recorded step -------------------------------------------------------------

@pytest.fixture(scope="module")
def golden_replay():
    z, meta = load_train_golden()
    case = GOLDENS / "mask_rcnn_tiny_r18"
    ref, _ = load_detector(case / "config.yaml", case / "state_dict.pth")
    n = 2
    images = [torch.from_numpy(z[f"img{i}_bgr_chw"]) for i in range(n)]
    metas = [dict(img_shape=tuple(int(v) for v in z[f"meta_img{i}_img_shape"])) for i in range(n)]
    gts = [dict(bboxes=z[f"gt_img{i}_bboxes"], labels=z[f"gt_img{i}_labels"], masks=z[f"gt_img{i}_masks"])
           for i in range(n)]
    inject = {s: [dict(pos_inds=z[f"{s}_sample_img{i}_pos_inds"], neg_inds=z[f"{s}_sample_img{i}_neg_inds"])
                  for i in range(n)] for s in ("rpn", "rcnn")}
    inject["proposals"] = [z[f"train_proposals_img{i}_boxes"] for i in range(n)]
    stages = {}
    total, log = parse_losses(ref.loss(images, metas, gts, inject=inject, stages=stages))
    ref.zero_grad()
    total.backward()
    grads = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}
    return z, meta, {k: float(v.detach()) for k, v in log.items()}, grads, stages


def test_reference_replays_visdet_losses(golden_replay):
    z, meta, log, _, stages = golden_replay
    errs = {k: rel_loss_err(log[k], want) for k, want in meta["log_vars"].items()}
    print("reference vs visdet loss terms (relative):", errs)
    assert set(log) == set(meta["log_vars"]) and max(errs.values()) <= LOSS_TOL, errs
    assert stages["targets.avg_factor"] == int(z["rpn_avg_factor"])


def test_reference_replays_visdet_targets(golden_replay):
    """Assignments, RPN targets, train-mode proposals, sampled RoIs and mask targets."""
    z, _, _, _, st = golden_replay
    for i in range(2):
        a = st["targets.assign_results"][i]
        assert np.array_equal(a.gt_inds.numpy(), z[f"rpn_assign_img{i}_gt_inds"])
        np.testing.assert_array_equal(a.max_overlaps.numpy(), z[f"rpn_assign_img{i}_max_overlaps"])
        k = len(z[f"gt_img{i}_labels"])
        r = st["rcnn.assign_results"][i]
        assert np.array_equal(r.gt_inds[k:].numpy(), z[f"rcnn_assign_img{i}_gt_inds"])
        assert np.array_equal(r.labels[k:].numpy(), z[f"rcnn_assign_img{i}_labels"])
        s = st["rcnn.sampling_results"][i]
        assert np.array_equal(s.pos_is_gt.numpy(), z[f"rcnn_sample_img{i}_pos_is_gt"])
        np.testing.assert_array_equal(s.priors.numpy(), z[f"rcnn_sample_img{i}_priors"])
        # the RPN's own train-mode proposals (nms_pre 2000) equal visdet's, end to end (up to tie flips)
        p = st["rpn_proposals"][i]
        rows = compare_detections("train_proposals", {k: p[k].numpy() for k in ("bboxes", "scores")},
                                  {"bboxes": z[f"train_proposals_img{i}_boxes"],
                                   "scores": z[f"train_proposals_img{i}_scores"]},
                                  box_atol=TOLERANCES["e2e.det.bboxes_px"].rtol,
                                  score_atol=TOLERANCES["e2e.det.scores"].rtol)
        assert all(r.passed for r in rows), "\n" + format_table(rows)
    for lvl in range(5):
        for name in ("labels", "label_weights"):
            assert np.array_equal(st[f"targets.{name}"][lvl].numpy(), z[f"rpn_target_{name}_{lvl}"])
        np.testing.assert_allclose(st["targets.bbox_targets"][lvl].numpy(), z[f"rpn_target_bbox_{lvl}"], atol=1e-6)
    np.testing.assert_array_equal(st["rcnn.rois"].numpy(), z["rcnn_rois"])
    labels, weights, targets, _ = st["rcnn.bbox_targets"]
    assert np.array_equal(labels.numpy(), z["rcnn_target_labels"])
    assert np.array_equal(weights.numpy(), z["rcnn_target_label_weights"])
    np.testing.assert_allclose(targets.numpy(), z["rcnn_target_bbox_targets"], atol=1e-6)
    np.testing.assert_array_equal(st["mask.rois"].numpy(), z["mask_rois"])
    assert np.array_equal(st["mask.mask_targets"].numpy(), z["mask_targets"])


def test_reference_replays_visdet_gradients(golden_replay):
    z, _, _, grads, _ = golden_replay
    errs = {k[len("grad_"):]: scale_err(grads[k[len("grad_"):]], z[k]) for k in z if k.startswith("grad_")}
    print("reference vs visdet gradients (scale-relative):", errs)
    assert len(errs) == 10 and max(errs.values()) <= GRAD_TOL, errs
    # visdet's frozen stem + layer1 (frozen_stages=1) get no gradient
    assert "backbone.conv1.weight" not in grads and "backbone.layer1.0.conv1.weight" not in grads


# -- (b) flaxdet vs reference/ ----------------------------------------------------------------------------

def photo_crops(sizes, seed=0):
    """Crops of the golden photos (real image content) of the given (h, w) sizes."""
    rng = np.random.default_rng(seed)
    photos = [golden_image("mask_rcnn_tiny_r18", n)["input_bgr_uint8"] for n in IMAGES]
    out = []
    for i, (h, w) in enumerate(sizes):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
        out.append(np.ascontiguousarray(p[y:y + h, x:x + w]))
    return out


def make_case(seed, images, num_gts, num_classes):
    """``num_gts[i]`` random GT boxes, labels and elliptic bitmap masks per image; a second GT
    duplicates the first (exact IoU ties in assignment)."""
    rng = np.random.default_rng(seed)
    gts = []
    for im, k in zip(images, num_gts):
        h, w = im.shape[:2]
        bw = rng.uniform(6, 0.7 * w, k)
        bh = rng.uniform(6, 0.7 * h, k)
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1).astype(np.float32)
        if k >= 2:
            boxes[1] = boxes[0]
        yy, xx = np.mgrid[:h, :w] + 0.5
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
        masks = (((xx[None] - cx[:, None, None]) / rx[:, None, None]) ** 2
                 + ((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2 <= 1).astype(np.uint8)
        gts.append(dict(bboxes=boxes.reshape(k, 4), labels=rng.integers(0, num_classes, k).astype(np.int64),
                        masks=masks.reshape(k, h, w)))
    return gts


class _ReLU(torch.autograd.Function):
    """relu (same forward and backward as torch's), counting its calls; at call ``flip_site`` the
    backward mask of the input nearest to 0 is inverted."""
    calls, flip_site = 0, None

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.flip = _ReLU.calls == _ReLU.flip_site
        _ReLU.calls += 1
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        mask = x > 0
        if ctx.flip:
            i = x.abs().argmin()
            mask.view(-1)[i] = ~mask.view(-1)[i]
        return g * mask


@contextmanager
def counted_relus(flip_site=None):
    """Every ReLU of reference/ (nn.ReLU and F.relu) goes through :class:`_ReLU`; yields a callable
    giving the number of ReLU calls so far."""
    saved = torch.nn.ReLU.forward, torch.nn.functional.relu
    _ReLU.calls, _ReLU.flip_site = 0, flip_site
    torch.nn.ReLU.forward = lambda self, x: _ReLU.apply(x)
    torch.nn.functional.relu = lambda x, inplace=False: _ReLU.apply(x)
    try:
        yield lambda: _ReLU.calls
    finally:
        torch.nn.ReLU.forward, torch.nn.functional.relu = saved


def reference_step(ref, images, gts, seed, flip_site=None, inject=None):
    """reference/ loss + backward with every parameter trainable (frozen ones included), samples drawn
    from a torch Generator seeded with ``seed`` (or ``inject``-ed). Returns (log, grads, stages)."""
    for p in ref.parameters():
        p.requires_grad_(True)
    stages = {}
    tensors = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]
    metas = [dict(img_shape=im.shape[:2]) for im in images]
    with counted_relus(flip_site) as calls:
        losses = ref.loss(tensors, metas, gts, inject=inject, generator=torch.Generator().manual_seed(seed),
                          stages=stages)
        stages["relu_calls"] = calls()
        total, log = parse_losses(losses)
        ref.zero_grad()
        total.backward()
    grads = {k: p.grad.numpy().copy() for k, p in ref.named_parameters()}
    return {k: float(v.detach()) for k, v in log.items()}, grads, stages


def grad_errors(grads, grads_ref):
    return {k: scale_err(grads[k], grads_ref[k]) for k in grads_ref}


def reference_samples(stages):
    """reference/'s draws as an ``inject`` for reference/ itself (visdet's index spaces)."""
    inject = {s: [dict(pos_inds=r.pos_inds, neg_inds=r.neg_inds) for r in stages[k]]
              for s, k in (("rpn", "targets.sampling_results"), ("rcnn", "rcnn.sampling_results"))}
    inject["proposals"] = [p["bboxes"] for p in stages["rpn_proposals"]]
    return inject


def gradient_noise(ref, images, gts, inject, rel=1e-6, draws=2):
    """How far reference/'s float32 gradients move when every parameter is multiplied by
    (1 + rel * N(0, 1)), samples and proposals fixed: ReLU inputs within that noise of 0 flip. flaxdet's
    forward differs from reference/'s by ~1e-6 relative, so a 1e-3 gradient comparison is meaningful
    only where this is well below 1e-3. (The golden R50 weights are not: 1e-7 noise already moves their
    backbone gradients by up to 5e-2 -- reference/ float32 vs float64 differ by 2e-3 to 3e-2 there --
    so (b) uses well-conditioned seeded weights.)"""
    base = [p.detach().clone() for p in ref.parameters()]
    _, g0, _ = reference_step(ref, images, gts, 0, inject=inject)
    gen, worst = torch.Generator().manual_seed(0), 0.0
    try:
        for _ in range(draws):
            with torch.no_grad():
                for p, b in zip(ref.parameters(), base):
                    p.copy_(b * (1 + rel * torch.randn(b.shape, generator=gen)))
            worst = max(worst, max(grad_errors(reference_step(ref, images, gts, 0, inject=inject)[1], g0).values()))
    finally:
        with torch.no_grad():
            for p, b in zip(ref.parameters(), base):
                p.copy_(b)
    return worst


def compare_flaxdet_to_reference(ref, images, gts, seed, noise_limit=GRAD_TOL / 4):
    """flaxdet (weights converted from ``ref``) vs reference/ with reference/'s draws (torch Generator
    ``seed``) injected into both. Asserts within tolerance; returns (loss errors, grad errors), or None
    if the case's gradients are too noisy in float32 to compare (see :func:`gradient_noise`)."""
    log_ref, grads_ref, st = reference_step(ref, images, gts, seed)
    noise = gradient_noise(ref, images, gts, reference_samples(st))
    if noise > noise_limit:
        return None
    flax = build_flax(ref.cfg)
    assert load_visdet_state_dict(flax, {k: v.numpy() for k, v in ref.state_dict().items()}).ok
    hp, wp = st["metas"][0]["batch_input_shape"]
    g_max = max(8, max(len(g["labels"]) for g in gts))
    batch = flaxdet_batch(images, [im.shape[:2] for im in images], gts, g_max, (hp, wp))
    samples = {"rpn": [(s.pos_inds.numpy(), s.neg_inds.numpy()) for s in st["targets.sampling_results"]],
               "rcnn": [(s.pos_inds.numpy(), s.neg_inds.numpy()) for s in st["rcnn.sampling_results"]]}
    props = [p["bboxes"].numpy() for p in st["rpn_proposals"]]
    inject = flaxdet_injection(flax, batch, samples, [len(g["labels"]) for g in gts], props)
    logs, grads, fst = loss_and_grads(flax, batch, jax.random.PRNGKey(0), inject, with_stages=True)

    assert int(fst["rpn_avg_factor"]) == st["targets.avg_factor"]

    assert set(logs) == set(log_ref), (sorted(logs), sorted(log_ref))
    assert set(grads) == set(grads_ref), set(grads) ^ set(grads_ref)
    loss_errs = {k: rel_loss_err(logs[k], log_ref[k]) for k in LOG_KEYS if k in log_ref}
    grad_errs = grad_errors(grads, grads_ref)
    worst = max(grad_errs, key=grad_errs.get)
    print(f"flaxdet vs reference: losses { {k: round(v, 5) for k, v in log_ref.items()} }\n"
          f"  loss errors { {k: f'{e:.1e}' for k, e in loss_errs.items()} }\n  max grad error "
          f"{grad_errs[worst]:.2e} ({worst}) over {len(grad_errs)} parameters; gradient noise {noise:.1e}")
    assert max(loss_errs.values()) <= LOSS_TOL, loss_errs
    bad = {k: e for k, e in grad_errs.items() if e > GRAD_TOL}
    if bad:  # one ReLU-boundary flip? (see the note at the top)
        for site in range(st["relu_calls"]):
            flipped = grad_errors(grads, reference_step(ref, images, gts, seed, flip_site=site)[1])
            if max(flipped.values()) <= GRAD_TOL:
                print(f"  explained by one ReLU-boundary flip at ReLU call {site}: max grad error "
                      f"{max(flipped.values()):.2e}")
                return loss_errs, flipped
    assert not bad, bad
    return loss_errs, grad_errs


SIZES = ((200, 250), (190, 243), (211, 262))  # batch 224x288; no side is a multiple of 32
NUM_GTS = (3, 0, 30)


@pytest.mark.parametrize("case, weight_seed", [pytest.param("mask_rcnn_tiny_r18", 4, marks=pytest.mark.slow),
                                               ("mask_rcnn_tiny_r50", 0)])
def test_flaxdet_equals_reference_golden_configs(case, weight_seed):
    """The golden configs with seeded weights (``conditioned_weights``; seeds whose gradients are
    stable in float32 for this batch, see :func:`gradient_noise`). R18 training is also checked against
    visdet itself by test_train_goldens.py, hence slow here."""
    from parity_tests.test_random_configs import conditioned_weights

    require_goldens()
    ref = build_ref(load_config(config_path(case)))
    conditioned_weights(ref, weight_seed)
    images = photo_crops(SIZES)
    gts = make_case(7, images, NUM_GTS, ref.cfg.roi_head.bbox_head.num_classes)
    assert compare_flaxdet_to_reference(ref, images, gts, seed=11) is not None, "ill-conditioned case"


# -- (c) random small configs -------------------------------------------------------------------------------

@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(depth=st.sampled_from([18, 34, 50]), base=st.sampled_from([8, 16]), classes=st.integers(1, 6),
       fc=st.sampled_from([32, 64]), mask_ch=st.sampled_from([8, 16]),
       h0=st.integers(90, 200), w0=st.integers(90, 200), h1=st.integers(90, 200), w1=st.integers(90, 200),
       k0=st.integers(0, 12), k1=st.integers(0, 12), faster=st.booleans(), seed=st.integers(0, 1000))
def test_flaxdet_equals_reference_random_configs(depth, base, classes, fc, mask_ch, h0, w0, h1, w1, k0, k1, faster,
                                                 seed):
    from parity_tests.test_random_configs import conditioned_weights, small_cfg

    cfg = small_cfg(depth, base, "pytorch", classes, fc, mask_ch, faster)
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, frozen_stages=1))
    ref = build_ref(cfg)
    conditioned_weights(ref, seed)
    images = photo_crops(((h0, w0), (h1, w1)), seed)
    gts = make_case(seed, images, (k0, k1), classes)
    assume(compare_flaxdet_to_reference(ref, images, gts, seed) is not None)


# -- config options beyond the presets' defaults: SmoothL1Loss, pos_weight --------------------------------------------

@pytest.mark.slow
def test_flaxdet_honours_smooth_l1_and_pos_weight():
    from flaxdet.config import SmoothL1LossCfg
    from parity_tests.test_random_configs import conditioned_weights

    cfg = load_config(config_path("mask_rcnn_tiny_r18"))
    rh, tc = cfg.roi_head, cfg.train_cfg
    rh = dataclasses.replace(rh, bbox_head=dataclasses.replace(rh.bbox_head, loss_bbox=SmoothL1LossCfg(beta=1 / 9)),
                             train_cfg=dataclasses.replace(rh.train_cfg, pos_weight=2.0))
    rpn = dataclasses.replace(cfg.rpn_head, loss_bbox=SmoothL1LossCfg(beta=1 / 9),
                              train_cfg=dataclasses.replace(cfg.rpn_head.train_cfg, pos_weight=3.0))
    cfg = dataclasses.replace(cfg, roi_head=rh, rpn_head=rpn, train_cfg=dataclasses.replace(
        tc, rcnn=dataclasses.replace(tc.rcnn, pos_weight=2.0), rpn=dataclasses.replace(tc.rpn, pos_weight=3.0)))
    ref = build_ref(cfg)
    conditioned_weights(ref, 4)
    images = photo_crops(SIZES[:2])
    compare_flaxdet_to_reference(ref, images, make_case(7, images, (3, 5), 5), seed=11)
