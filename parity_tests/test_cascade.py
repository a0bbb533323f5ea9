"""Cascade R-CNN and Cascade Mask R-CNN (visdet ``CascadeRCNN`` / ``CascadeRoIHead``): presets, conversion,
per-stage parity, training losses and fine-tuning, the CLI.

No visdet recording of a cascade model exists (../shared/goldens has none), so reference/ -- visdet's
CascadeRoIHead numerics, checked by reading visdet's source -- is the oracle, as in test_random_configs.py
and test_architectures.py: for each preset (``cascade_mask_rcnn_r50``, ``cascade_rcnn_r50``) a shrunk twin
(ResNet-18 base 8, FPN 16, 3 classes, fc 32; the three stages, their coders, assigners and loss weights
kept) gets seeded, well-conditioned weights (:func:`cascade_weights`) and is saved by reference/ as a
visdet-layout runner checkpoint, then

* the published presets build visdet's module tree (400 state_dict keys, 77,324,606 parameters for
  cascade_mask_rcnn_r50; 364 keys without masks), and (slow) their full-size state_dicts convert strictly
  and export back bit-identically;
* the small checkpoints convert strictly with the production converter and export back bit-identically;
* flaxdet under ``jax.jit`` matches reference/ stage by stage (every cascade stage's refined RoIs,
  features and head outputs, the averaged logits, every stage's mask logits and the merged probabilities)
  with the tolerance table (``flaxdet.parity.TOLERANCES``), and the detections are the same (count,
  order, labels, boxes, scores, masks) -- mask preset by default, the bbox-only one under ``slow``;
* (slow) training: flaxdet ``loss_and_grads`` equals reference/'s cascade loss + backward with
  reference/'s samples of every stage injected (every ``s{k}.*`` term within ``train.loss``, every
  parameter gradient within ``train.grad``);
* (slow) a few SGD steps of flaxdet's jitted train step on the synthetic set lower the loss, frozen
  stages stay put;
* (slow) the CLI: ``presets`` lists both, ``convert`` + ``infer`` on a golden photo give reference/'s
  detections, ``parity --against reference`` passes.

Default-run cost: ~40-60 s on 2 cores (one XLA compile of the small cascade Mask R-CNN).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flaxdet.config import dump_yaml, load_config
from flaxdet.inference import Detector, make_batch, unpad
from flaxdet.models import build_detector as build_flax
from flaxdet.parity import MASK_PIXELS_PER_IMAGE, TOLERANCES, compare_detections, format_table
from flaxdet.parity.harness import compare_stages, flaxdet_stages, geometry_of, torch_stages
from flaxdet_converters.checkpoint_io import load_checkpoint, save_checkpoint
from flaxdet_converters.convert import export_visdet_state_dict, load_visdet_state_dict
from flaxdet_reference import build_detector as build_ref
from parity_tests.test_architectures import assert_frozen_unchanged
from parity_tests.test_random_configs import seeded_state_dict

PRESETS = {True: "cascade_mask_rcnn_r50", False: "cascade_rcnn_r50"}
SHAPES = ((150, 190), (128, 171))  # a batch of two sizes, neither a multiple of 32
CLASSES = 3
MASK = pytest.param(True, id="cascade_mask_rcnn")
BBOX = pytest.param(False, id="cascade_rcnn")
BBOX_SLOW = pytest.param(False, id="cascade_rcnn", marks=pytest.mark.slow)


def small_cascade_cfg(mask=True, depth=18, base=8, classes=CLASSES, fc=32, mask_ch=8):
    """The cascade preset shrunk like ``test_architectures.shrink`` (which takes one bbox/mask head; a
    cascade has a tuple, one per stage): ResNet-18 base 8, FPN 16 channels, ``classes`` classes, fc 32."""
    cfg = load_config(PRESETS[mask])
    exp = 1 if depth in (18, 34) else 4
    rh = cfg.roi_head
    rh = dataclasses.replace(
        rh, bbox_head=tuple(dataclasses.replace(h, in_channels=16, fc_out_channels=fc, num_classes=classes)
                            for h in rh.bbox_head),
        bbox_roi_extractor=tuple(dataclasses.replace(e, out_channels=16) for e in rh.bbox_roi_extractor))
    if mask:
        rh = dataclasses.replace(
            rh, mask_head=tuple(dataclasses.replace(h, in_channels=16, num_classes=classes, conv_out_channels=mask_ch)
                                for h in rh.mask_head),
            mask_roi_extractor=tuple(dataclasses.replace(e, out_channels=16) for e in rh.mask_roi_extractor))
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, depth=depth, base_channels=base, init_cfg=None),
        neck=dataclasses.replace(cfg.neck, in_channels=tuple(base * 2**i * exp for i in range(4)), out_channels=16),
        rpn_head=dataclasses.replace(cfg.rpn_head, in_channels=16, feat_channels=16), roi_head=rh)


def cascade_weights(ref, seed, images, metas, spread=0.5):
    """``test_random_configs.seeded_state_dict`` (BN statistics near identity, He-normal weights) with the
    RPN classifier x2 as in ``conditioned_weights`` (which scales a single head's fc_cls), then, per cascade
    stage, its fc_cls bias shifted so each class logit has zero mean over the RoIs of ``images`` (ReLU features
    have a large common mean, which otherwise hands every RoI the same class) and scaled by ``spread`` (varied
    labels, scores 0.3-0.8, all three stages carrying signal). Returns the state_dict (numpy)."""
    sd = seeded_state_dict(ref, seed)
    sd["rpn_head.rpn_cls.weight"] = sd["rpn_head.rpn_cls.weight"] * 2  # as conditioned_weights: no sigmoid ties
    ref.load_state_dict(sd, strict=True)
    stages = {}
    with torch.no_grad():
        ref.predict(_tensors(images), metas, stages=stages)
    for s in range(ref.roi_head.num_stages):
        cls = stages["bbox_head.cls_score" if s == 0 else f"cascade.bbox_head.{s}.cls_score"]
        p = f"roi_head.bbox_head.{s}.fc_cls."
        sd[p + "bias"] = (sd[p + "bias"] - cls.mean(0)) * spread
        sd[p + "weight"] = sd[p + "weight"] * spread
    ref.load_state_dict(sd, strict=True)
    return {k: v.numpy() for k, v in sd.items()}


def _tensors(images):
    return [torch.from_numpy(i).permute(2, 0, 1).contiguous() for i in images]


def _images(shapes=SHAPES, seed=0):
    from parity_tests.goldens import require_goldens
    from parity_tests.test_train_reference import photo_crops

    require_goldens()
    return photo_crops(shapes, seed)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """mask (bool) -> the small cascade model of that preset, its seeded weights and a visdet-layout runner
    checkpoint of them (built once per module)."""
    made = {}

    def get(mask):
        if mask not in made:
            d = tmp_path_factory.mktemp(PRESETS[mask])
            cfg = small_cascade_cfg(mask)
            images = _images()
            metas = [dict(ori_shape=s, img_shape=s, scale_factor=(1.0, 1.0, 1.0, 1.0)) for s in SHAPES]
            ref = build_ref(cfg).eval()
            sd = cascade_weights(ref, 0, images, metas)
            ckpt = save_checkpoint(d / "cascade.pth", sd, classes=[f"c{i}" for i in range(CLASSES)])
            (d / "cascade.yaml").write_text(dump_yaml(cfg))
            made[mask] = dict(cfg=cfg, ref=ref, sd=sd, ckpt=ckpt, config=d / "cascade.yaml", images=images,
                              metas=metas, dir=d)
        return made[mask]

    return get


def _converted(case, abstract=True):
    """flaxdet model built from the case's config, loaded strictly from its .pth by the production converter.
    ``abstract``: built under ``nnx.eval_shape`` (no random init: ~40 one-off XLA compiles of the
    initialisers, 15-30 s on 2 cores) -- strict conversion fills every variable, so nothing abstract is
    left (an unfilled one would fail export and jit). The CLI and full-size tests build concretely."""
    flax = nnx.eval_shape(lambda: build_flax(case["cfg"])) if abstract else build_flax(case["cfg"])
    report = load_visdet_state_dict(flax, load_checkpoint(case["ckpt"]).state_dict, strict=True)
    assert report.ok, report.summary()
    return flax, report


# ------------------------------------------------------------------------------------ presets, conversion
def test_presets_build_visdets_module_tree():
    for name, keys, params in (("cascade_mask_rcnn_r50", 400, 77_324_606), ("cascade_rcnn_r50", 364, None)):
        cfg = load_config(name)
        rh = cfg.roi_head
        assert cfg.TYPE == "CascadeRCNN" and rh.TYPE == "CascadeRoIHead" and rh.num_stages == 3
        assert [h.bbox_coder.target_stds for h in rh.bbox_head] == [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                                                     (0.033, 0.033, 0.067, 0.067)]
        assert [t.assigner.pos_iou_thr for t in rh.train_cfg] == [0.5, 0.6, 0.7]
        assert rh.stage_loss_weights == (1.0, 0.5, 0.25) and cfg.train_cfg.rcnn == rh.train_cfg
        ref = build_ref(cfg)
        sd = ref.state_dict()
        assert len(sd) == keys, len(sd)
        if params is not None:  # visdet's built model (numerics spec section 2)
            assert sum(p.numel() for p in ref.parameters()) == params
        assert sd["roi_head.bbox_head.2.fc_reg.weight"].shape == (4, 1024)  # class-agnostic regression
        assert ("roi_head.mask_head.2.conv_logits.weight" in sd) == (rh.mask_head is not None)


@pytest.mark.slow  # two full-size (~70M parameter) models, a .pth each
@pytest.mark.parametrize("preset", list(PRESETS.values()))
def test_full_size_checkpoint_converts_and_round_trips(preset, tmp_path):
    """As test_architectures (a): the preset's reference/ state_dict, written to a real .pth, converts
    strictly into flaxdet and exports back bit-identically (keys, order, dtypes, values)."""
    cfg = load_config(preset)
    path = save_checkpoint(tmp_path / f"{preset}.pth", build_ref(cfg).state_dict())
    sd = load_checkpoint(path).state_dict
    flax = build_flax(cfg)
    report = load_visdet_state_dict(flax, sd, strict=True)
    assert report.ok and len(report.converted) == len(sd), report.summary()
    back = export_visdet_state_dict(flax, key_order=list(sd))
    assert list(back) == list(sd)
    for k, v in sd.items():
        v = np.asarray(v)
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k


@pytest.mark.goldens
@pytest.mark.parametrize("mask", [MASK, BBOX])
def test_checkpoint_converts_strictly_and_round_trips(mask, cases):
    case = cases(mask)
    flax, report = _converted(case)
    assert len(report.converted) == len(case["sd"]), report.summary()
    for s in range(3):
        assert any(k.startswith(f"roi_head.bbox_head.{s}.") for k in report.converted)
        assert any(k.startswith(f"roi_head.mask_head.{s}.") for k in report.converted) == mask
    back = export_visdet_state_dict(flax, list(load_checkpoint(case["ckpt"]).state_dict))
    assert list(back) == list(case["sd"])
    for k, v in case["sd"].items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k


# ------------------------------------------------------------------------------------------ parity
def _first_image(theirs):
    """reference/'s batch stages restricted to image 0 (flaxdet_stages keeps image 0 too)."""
    n_prop, n_det = len(theirs["proposals.bboxes"]), len(theirs["det.bboxes"])
    out = {k: v[:1] for k, v in theirs.items() if k.startswith(("preprocessed", "backbone", "neck", "rpn_head"))}
    for k, v in theirs.items():
        if k in ("bbox_roi_extractor", "bbox_head.cls_score", "bbox_head.bbox_pred") or \
                k.startswith(("cascade.rois", "cascade.bbox_", "cascade.cls_score")):
            out[k] = v[:n_prop]
        elif k in ("mask_roi_extractor", "mask_head.mask_preds") or k.startswith(("cascade.mask_",)):
            out[k] = v[:n_det]
        elif k.startswith(("proposals", "det.")):
            out[k] = v
    return out


@pytest.mark.goldens
@pytest.mark.parametrize("mask", [MASK, BBOX_SLOW])  # one XLA compile each (~20-40 s on 2 cores)
def test_flaxdet_jit_matches_reference_stage_by_stage(mask, cases):
    case = cases(mask)
    cfg, ref = case["cfg"], case["ref"]
    stages = {}
    with torch.no_grad():
        ref_res = ref.predict(_tensors(case["images"]), case["metas"], stages=stages)
    theirs = _first_image(torch_stages(stages))
    flax, _ = _converted(case)
    batch = make_batch(case["images"], case["metas"])
    dets, fst = jax.device_get(Detector(flax).predict_batch(batch, with_stages=True))
    ours_all = unpad(dets, batch)
    ours = flaxdet_stages(fst, ours_all[0])
    bgeo, mgeo = geometry_of(cfg)
    rows = compare_stages(ours, theirs, bbox_geometry=bgeo, mask_geometry=mgeo,
                          scale_factor=case["metas"][0]["scale_factor"])
    table = format_table(rows)
    print("\n" + table)
    assert all(r.passed for r in rows), "\n" + table
    names = {r.stage for r in rows}
    for s in (1, 2):  # every later stage was compared
        assert {f"cascade.rois.{s}", f"cascade.bbox_roi_extractor.{s}", f"cascade.bbox_head.{s}.cls_score",
                f"cascade.bbox_head.{s}.bbox_pred"} <= names
        assert (f"cascade.mask_head.{s}.mask_preds" in names) == mask
    assert "cascade.cls_score" in names
    assert ("cascade.mask_probs" in names) == mask and ("det.masks" in names) == mask
    # well-conditioned: the stages carry signal (refinement moves the RoIs, labels vary, no saturation)
    assert np.abs(theirs["cascade.rois.1"] - theirs["proposals.bboxes"]).mean() > 0.5
    assert np.abs(theirs["cascade.rois.2"] - theirs["cascade.rois.1"]).mean() > 0.5
    assert len(np.unique(theirs["det.labels"])) == CLASSES and theirs["det.scores"].max() < 0.95
    # detections identical on both images: same count, order (tie flips only between equal scores),
    # labels, boxes, scores (and masks)
    for i, (o, t) in enumerate(zip(ours_all, ref_res)):
        t = {k: v.numpy() for k, v in t.items()}
        assert len(t["scores"]) > 5 and set(o) == set(t)
        rows = compare_detections(f"det[{i}]", o, t, box_atol=TOLERANCES["e2e.det.bboxes_px"].rtol,
                                  score_atol=TOLERANCES["e2e.det.scores"].rtol, mask_pixels=MASK_PIXELS_PER_IMAGE)
        print(format_table(rows))
        assert all(r.passed for r in rows), "\n" + format_table(rows)
        np.testing.assert_array_equal(o["labels"], t["labels"])


# ----------------------------------------------------------------------------------------- training
TRAIN_SIZES = ((200, 250), (190, 243), (211, 262))  # batch 224x288; no side is a multiple of 32
TRAIN_GTS = (4, 0, 10)  # an image without GT; a duplicated GT (IoU ties) in the others
TRAIN_GT_SEED = 6  # GTs whose float32 gradients are stable (test_train_reference.gradient_noise): 3e-5 / 1.8e-4


def reference_cascade_samples(st, num_stages):
    """reference/'s draws (``reference_step`` stages) as an ``inject`` for reference/ itself."""
    inject = {"rpn": [dict(pos_inds=r.pos_inds, neg_inds=r.neg_inds) for r in st["targets.sampling_results"]],
              "rcnn": [[dict(pos_inds=r.pos_inds, neg_inds=r.neg_inds) for r in st[f"s{k}.rcnn.sampling_results"]]
                       for k in range(num_stages)]}
    inject["proposals"] = [p["bboxes"] for p in st["rpn_proposals"]]
    return inject


def flaxdet_cascade_injection(model, batch, st, num_gts):
    """reference/'s draws of every stage in flaxdet's layouts. RPN and stage 0 as the Standard head's
    (``train_golden.flaxdet_injection``, with stage 0's sampler); stage k > 0: reference/ indexes
    ``[its GTs; stage k-1's sampled rows minus the positives that were GTs]``, flaxdet ``[G GT slots;
    stage k-1's Spos + Sneg row slots]`` (the dropped and padded slots invalid), so index j >= k_gt maps
    to the slot of the (j - k_gt)-th kept row."""
    from parity_tests.train_golden import _pad, flaxdet_injection

    rh = model.roi_head
    g_max = batch["gt_bboxes"].shape[1]
    samples = {"rpn": [(s.pos_inds.numpy(), s.neg_inds.numpy()) for s in st["targets.sampling_results"]],
               "rcnn": [(s.pos_inds.numpy(), s.neg_inds.numpy()) for s in st["s0.rcnn.sampling_results"]]}
    inject = flaxdet_injection(model, batch, samples, num_gts, [p["bboxes"].numpy() for p in st["rpn_proposals"]],
                               rh.cfg.train_cfg[0])
    rcnn = [inject["rcnn"]]
    for k in range(1, rh.num_stages):
        prev_cfg, cur_cfg = rh.cfg.train_cfg[k - 1].sampler, rh.cfg.train_cfg[k].sampler
        prev_pos = int(prev_cfg.num * prev_cfg.pos_fraction)
        caps = (int(cur_cfg.num * cur_cfg.pos_fraction), cur_cfg.num)
        out = {}
        for i, (prev, cur) in enumerate(zip(st[f"s{k - 1}.rcnn.sampling_results"], st[f"s{k}.rcnn.sampling_results"])):
            pos_is_gt = prev.pos_is_gt.numpy().astype(bool)
            kept = np.concatenate([np.nonzero(~pos_is_gt)[0], prev_pos + np.arange(len(prev.neg_inds))])
            ng = num_gts[i]
            for part, cap, idx in zip(("pos", "neg"), caps, (cur.pos_inds.numpy(), cur.neg_inds.numpy())):
                idx = idx.astype(np.int64)
                mapped = np.where(idx < ng, idx, g_max + kept[np.clip(idx - ng, 0, max(len(kept) - 1, 0))]) \
                    if len(idx) else idx
                ix, valid = _pad(mapped, cap)
                out.setdefault(f"{part}_inds", []).append(ix)
                out.setdefault(f"{part}_valid", []).append(valid)
        rcnn.append({name: jnp.asarray(np.stack(v)) for name, v in out.items()})
    inject["rcnn"] = rcnn
    return inject


def gradient_noise_per_param(ref, images, gts, inject, rel=1e-6, draws=2):
    """``test_train_reference.gradient_noise`` per parameter: how far each of reference/'s float32
    gradients moves when every parameter is multiplied by (1 + rel * N(0, 1)), samples fixed."""
    from parity_tests.test_train_reference import grad_errors, reference_step

    base = [p.detach().clone() for p in ref.parameters()]
    _, g0, _ = reference_step(ref, images, gts, 0, inject=inject)
    gen, worst = torch.Generator().manual_seed(0), {}
    try:
        for _ in range(draws):
            with torch.no_grad():
                for p, b in zip(ref.parameters(), base):
                    p.copy_(b * (1 + rel * torch.randn(b.shape, generator=gen)))
            for k, e in grad_errors(reference_step(ref, images, gts, 0, inject=inject)[1], g0).items():
                worst[k] = max(worst.get(k, 0.0), e)
    finally:
        with torch.no_grad():
            for p, b in zip(ref.parameters(), base):
                p.copy_(b)
    return worst


@pytest.mark.goldens
@pytest.mark.slow  # one XLA compile of the cascade's loss + gradients (~1-2 min on 2 cores)
@pytest.mark.parametrize("mask", [MASK, BBOX])
def test_training_equals_reference(mask, cases):
    """flaxdet ``loss_and_grads`` vs reference/ ``CascadeRCNN.loss`` + backward, on the same converted
    weights, images and GTs, with reference/'s samples of the RPN and of every cascade stage (drawn from a
    torch Generator) injected: every loss term (``s{k}.loss_cls/acc/loss_bbox[/loss_mask]``, RPN, total)
    within ``train.loss``; every parameter gradient within ``train.grad`` -- or, for a parameter whose
    float32 gradient is itself unstable (:func:`gradient_noise_per_param` > ``train.grad`` / 4: the
    8-channel mask heads of the later stages, with few positives, sit on ReLU boundaries), within 4x its
    own noise. Both are printed."""
    from flaxdet.training.step import loss_and_grads
    from parity_tests.test_train_reference import (
        GRAD_TOL,
        LOSS_TOL,
        grad_errors,
        make_case,
        photo_crops,
        reference_step,
        rel_loss_err,
    )
    from parity_tests.train_golden import flaxdet_batch

    case = cases(mask)
    ref = case["ref"]
    images = photo_crops(TRAIN_SIZES)
    gts = make_case(TRAIN_GT_SEED, images, TRAIN_GTS, CLASSES)
    try:
        log_ref, grads_ref, st = reference_step(ref, images, gts, seed=11)
        noise = gradient_noise_per_param(ref, images, gts, reference_cascade_samples(st, ref.roi_head.num_stages))
    finally:
        ref.eval()
    # every stage sampled positives (GTs and refined proposals), so each stage's losses are exercised
    for k in range(3):
        res = st[f"s{k}.rcnn.sampling_results"]
        assert sum(len(r.pos_inds) for r in res) > sum(int(r.pos_is_gt.sum()) for r in res) > 0, k
    flax, _ = _converted(case)
    hp, wp = st["metas"][0]["batch_input_shape"]
    batch = flaxdet_batch(images, [im.shape[:2] for im in images], gts, 16, (hp, wp))
    inject = flaxdet_cascade_injection(flax, batch, st, [len(g["labels"]) for g in gts])
    logs, grads = loss_and_grads(flax, batch, jax.random.PRNGKey(0), inject)
    assert set(logs) == set(log_ref), (sorted(logs), sorted(log_ref))
    assert all((f"s{k}.loss_mask" in logs) == mask for k in range(3))
    assert set(grads) == set(grads_ref), set(grads) ^ set(grads_ref)
    loss_errs = {k: rel_loss_err(float(logs[k]), log_ref[k]) for k in log_ref}
    grad_errs = grad_errors(grads, grads_ref)
    tol = {k: max(GRAD_TOL, 4 * noise[k]) for k in grad_errs}
    worst = max(grad_errs, key=grad_errs.get)
    noisy = {k: f"{noise[k]:.1e}" for k in grad_errs if tol[k] > GRAD_TOL}
    print(f"\nreference losses { {k: round(v, 5) for k, v in log_ref.items()} }\n"
          f"loss errors (relative) { {k: f'{e:.1e}' for k, e in loss_errs.items()} }\n"
          f"max grad error {grad_errs[worst]:.2e} ({worst}) over {len(grad_errs)} parameters; "
          f"float32-noisy parameters (own noise): {noisy}")
    assert max(loss_errs.values()) <= LOSS_TOL, loss_errs
    assert len(noisy) <= len(grad_errs) // 10, f"ill-conditioned case: {len(noisy)} noisy gradients"
    bad = {k: (f"{e:.1e}", f"{tol[k]:.1e}") for k, e in grad_errs.items() if e > tol[k]}
    assert not bad, bad


@pytest.mark.goldens
@pytest.mark.slow  # one XLA compile of the jitted train step (~1-2 min on 2 cores)
@pytest.mark.parametrize("mask", [MASK, BBOX])
def test_fine_tune_lowers_the_loss_and_keeps_frozen_params(mask, cases, tmp_path):
    """As test_architectures (c): SGD steps of flaxdet's jitted train step on one synthetic batch (same
    samples each step) lower the total loss and every stage's; frozen_stages parameters do not move."""
    from flaxdet.data.coco import CocoDataset, TrainLoader
    from flaxdet.data.synthetic import make_synthetic_coco
    from flaxdet.training.optimizers import make_optimizer
    from flaxdet.training.step import TrainState

    flax, _ = _converted(cases(mask))
    ann = make_synthetic_coco(tmp_path / "data", num_images=4, seed=5, min_size=(96, 128), max_size=(128, 160))
    loader = TrainLoader(CocoDataset(ann), 2, (160, 128), max_gt=8, seed=0, flip_prob=0.0, with_masks=mask)
    batch, _ = loader.make_batch(0)
    tx, _ = make_optimizer("sgd", lr=0.01, weight_decay=1e-4, warmup_iters=1)
    state = TrainState(flax, tx)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    key = jax.random.PRNGKey(0)
    logs = [jax.device_get(state.train_step(batch, key)) for _ in range(6)]
    losses = [float(m["loss"]) for m in logs]
    print("\nlosses", [round(v, 4) for v in losses])
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses
    for k in range(3):
        assert f"s{k}.loss_cls" in logs[0] and (f"s{k}.loss_mask" in logs[0]) == mask
        stage = [sum(float(m[n]) for n in m if n.startswith(f"s{k}.loss")) for m in logs]
        assert stage[-1] < stage[0], (k, stage)
    flat = assert_frozen_unchanged(state, before)
    for k in range(3):  # every stage's heads trained
        assert any(m for n, m in flat.items() if n.startswith(f"roi_head.bbox_head.{k}.")), k
        assert any(m for n, m in flat.items() if n.startswith(f"roi_head.mask_head.{k}.")) == mask, k


# ---------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flaxdet.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def test_cli_presets_lists_the_cascades():
    r = _cli("presets")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    for name in PRESETS.values():
        assert "CascadeRCNN" in lines[name] and "ResNet-50" in lines[name] and "80 classes" in lines[name]


@pytest.mark.goldens
@pytest.mark.slow  # three CLI processes, each compiling the small cascade (~1-2 min each on 2 cores)
@pytest.mark.parametrize("mask", [MASK, BBOX])
def test_cli_convert_infer_parity(mask, cases, tmp_path):
    """``flaxdet convert`` (strict) of the small cascade checkpoint, ``flaxdet infer`` on the golden
    'color' photo (288x512, its own scale) gives reference/'s detections (count, labels, boxes within
    ``e2e.det.bboxes_px``, scores within ``e2e.det.scores``, masks within the pixel budget), and ``flaxdet
    parity --against reference`` passes on it."""
    import cv2

    from flaxdet.data.transforms import prepare_test_image
    from parity_tests.goldens import GOLDENS, require_goldens

    require_goldens()
    case = cases(mask)
    with np.load(GOLDENS / "mask_rcnn_tiny_r18" / "color.npz") as z:
        photo = z["input_bgr_uint8"]
    img = tmp_path / "color.png"
    cv2.imwrite(str(img), photo)
    model_dir = tmp_path / "model"
    r = _cli("convert", case["ckpt"], "--config", case["config"], "--out", model_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _cli("infer", "--checkpoint", model_dir, "--images", img, "--out", tmp_path / "infer", "--scale", 512, 288,
             "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "infer" / "results.json").read_text())
    im, meta = prepare_test_image(str(img), (512, 288))
    with torch.no_grad():
        want = {k: v.numpy() for k, v in case["ref"].predict(_tensors([im]), [meta])[0].items()}
    assert len(want["scores"]) > 5 and len(res) == len(want["scores"])
    got = dict(bboxes=np.array([d["bbox"] for d in res], np.float32).reshape(-1, 4),
               scores=np.array([d["score"] for d in res], np.float32),
               labels=np.array([d["category_id"] for d in res], np.int64))
    got["bboxes"][:, 2:] += got["bboxes"][:, :2]  # xywh -> xyxy
    if mask:
        from pycocotools import mask as mask_utils

        got["masks"] = np.stack([mask_utils.decode(d["segmentation"]).astype(bool) for d in res])
    rows = compare_detections("cli", got, want, box_atol=TOLERANCES["e2e.det.bboxes_px"].rtol,
                              score_atol=TOLERANCES["e2e.det.scores"].rtol, mask_pixels=MASK_PIXELS_PER_IMAGE)
    assert all(r.passed for r in rows), "\n" + format_table(rows)
    assert (tmp_path / "infer" / "overlays" / "color.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _cli("parity", "--config", case["config"], "--checkpoint", case["ckpt"], "--image", img,
             "--out", tmp_path / "parity", "--scale", 512, 288)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())
    assert report["passed"] is True
    assert {f"cascade.rois.{s}" for s in (1, 2)} <= {row["stage"] for row in report["stages"]}
