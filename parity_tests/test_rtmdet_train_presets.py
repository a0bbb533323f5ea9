"""RTMDet / RTMDet-Ins training at full size: a seeded visdet-architecture model (reference/'s init,
``torch.manual_seed(0)``, 80 classes) converted to flaxdet gives the same training step in both -- loss terms per
level and the mask loss, the assignment, every parameter gradient and every BN running statistic after the step
(all BNs in train mode) -- on a mixed-size batch of two real-photo crops (the second padded smaller than the batch,
so some of its priors are invalid) with seeded elliptical GT. Both sides index the mask kernels correctly (flaxdet's
default; visdet's kernel-index bug is checked against the goldens in test_rtmdet_train_goldens.py).

tiny presets by default, the others ``slow``. Tolerances: flaxdet.parity.TOLERANCES (``rtmdet.train.*``,
``train.grad``). The tiny presets are held to them strictly. Deeper seeded models in train mode are ill-conditioned
in float32 (perturbing reference/'s input by 1e-7 relative moves its rtmdet_ins_m gradients by up to 12%): for them
reference/ run in float64 is the arbiter, and a quantity passes when flaxdet's float32 distance from it is within the
tolerance or within ``rtmdet.train.sensitivity`` times reference/'s own float32 distance from it.
"""
from __future__ import annotations

import copy
import gc

import jax
import numpy as np
import pytest
import torch

from flaxdet.data.transforms import pad_ground_truth
from flaxdet.models import build_detector
from flaxdet.parity import TOLERANCES
from flaxdet_converters.convert import load_visdet_state_dict
from parity_tests.goldens import golden_image
from parity_tests.rtmdet_train_golden import flax_step
from parity_tests.test_rtmdet_presets import SIZES, preset_config

PARAMS = [pytest.param(f"{fam}_{s}", marks=() if s == "tiny" else pytest.mark.slow)
          for fam in ("rtmdet", "rtmdet_ins") for s in SIZES]
SIZES_HW = ((192, 256), (150, 200))  # the second pads to 160x224 inside the 192x256 batch


def ellipse_gt(h, w, rng, k):
    yy, xx = np.mgrid[:h, :w]
    boxes, labels, masks = [], [], []
    for _ in range(k):
        ry, rx = rng.uniform(0.12, 0.4) * h, rng.uniform(0.12, 0.4) * w
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(rng.integers(0, 80))
        masks.append(m)
    return dict(bboxes=np.asarray(boxes, np.float32), labels=np.asarray(labels, np.int64),
                masks=np.asarray(masks, np.uint8))


def condition_reg(ref, cfg, dist=3.0, spread=0.25):
    """Well-conditioned boxes: reference/'s seeded ``rtm_reg`` predicts distances of ``dist`` strides give or take
    ``spread`` (in the exp domain with ``exp_on_reg``) -- seeded weights otherwise predict boxes that barely overlap
    their GT, whose IoU (the GIoU loss's weight and the assigner's soft label) is a difference of nearly equal
    coordinates: float32 rounding then dominates the box loss of a level."""
    g = torch.Generator().manual_seed(2)
    exp = getattr(cfg.bbox_head, "exp_on_reg", False) and "Ins" not in cfg.bbox_head.TYPE
    with torch.no_grad():
        for conv in ref.bbox_head.rtm_reg:
            c = conv.weight.shape[1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (spread / c ** 0.5) *
                              (1.0 if exp else dist))
            conv.bias.fill_(float(np.log(dist)) if exp else dist)


@pytest.fixture(scope="module")
def crops():
    photo = golden_image("rtmdet/rtmdet_tiny", "coco_test_12510")["input_bgr_uint8"]  # 320x480
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate(SIZES_HW):
        y0, x0 = 40 * i, 60 + 100 * i
        out.append((np.ascontiguousarray(photo[y0:y0 + h, x0:x0 + w]), ellipse_gt(h, w, rng, 3 + i)))
    return out


def reference_step(ref, pre, metas, gts, stages, kw):
    """reference/'s training step on a fresh copy of ``ref`` (train mode): (raw losses as floats, gradients by key,
    state_dict after the step)."""
    m = copy.deepcopy(ref)
    m.train()
    raw = m.loss(pre, metas, gts, stages=stages, **kw)
    sum(sum(v) if isinstance(v, list) else v for v in raw.values()).backward()
    raw = {k: ([float(x) for x in v] if isinstance(v, list) else float(v)) for k, v in raw.items()}
    grads = {k: p.grad.numpy() for k, p in m.named_parameters(remove_duplicate=False) if p.grad is not None}
    return raw, grads, {k: v.numpy() for k, v in m.state_dict().items()}


@pytest.mark.goldens
@pytest.mark.parametrize("name", PARAMS)
def test_train_step_equal(name, crops):
    cfg = preset_config(name)
    torch.manual_seed(0)
    from flaxdet_reference import build_detector as build_reference

    ref = build_reference(cfg)
    condition_reg(ref, cfg)
    sd = {k: v.detach().clone().numpy() for k, v in ref.state_dict().items()}
    factor = TOLERANCES["rtmdet.train.sensitivity"].rtol
    model = build_detector(cfg)
    assert load_visdet_state_dict(model, sd).ok
    ins = "ins" in name

    # reference/: train mode, correct kernel indexing, on the preprocessed batch
    hp, wp = SIZES_HW[0]
    images = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im, _ in crops]
    pre, _ = ref.data_preprocessor(images)
    metas = [dict(img_shape=im.shape[:2]) for im, _ in crops]
    gts = [dict(g) if ins else {k: g[k] for k in ("bboxes", "labels")} for _, g in crops]
    kw = dict(emulate_kernel_index_bug=False) if ins else {}
    stages = {}
    raw, ref_grads, ref_after = reference_step(ref, pre, metas, gts, stages, kw)
    # deeper presets: reference/ in float64 is the arbiter (module doc)
    exact = None if name.endswith("_tiny") else reference_step(copy.deepcopy(ref).double(), pre.double(), metas,
                                                                 gts, {}, kw)

    # flaxdet: the same batch (BGR crops zero-padded, visdet's per-image pad_shape)
    imgs = np.zeros((len(crops), hp, wp, 3), np.uint8)
    for i, (im, _) in enumerate(crops):
        imgs[i, : im.shape[0], : im.shape[1]] = im
    shapes = np.array([im.shape[:2] for im, _ in crops], np.int32)
    batch = dict(images=imgs, img_shapes=shapes, pad_shapes=(-(-shapes // 32) * 32).astype(np.int32))
    batch.update(pad_ground_truth([g for _, g in crops], 8, hp, wp))
    logs, st, grads, after = flax_step(model, batch)

    # each term against the scale of its loss (the sum over levels): seeded weights predict boxes that barely
    # overlap their GT, so a small level's GIoU term (weighted by those IoUs) is ill-conditioned on its own
    tol = TOLERANCES["rtmdet.train.loss"].rtol
    ours = {f"{key}.{lvl}": float(st[f"{key}.{lvl}"]) for key in ("loss_cls", "loss_bbox") for lvl in range(3)}
    theirs = {f"{key}.{lvl}": float(raw[key][lvl]) for key in ("loss_cls", "loss_bbox") for lvl in range(3)}
    scale = {f"{key}.{lvl}": sum(abs(float(x)) for x in raw[key])
             for key in ("loss_cls", "loss_bbox") for lvl in range(3)}
    if ins:
        ours["loss_mask"], theirs["loss_mask"] = logs["loss_mask"], float(raw["loss_mask"])
        scale["loss_mask"] = abs(float(raw["loss_mask"]))
    if exact is None:  # each term against the scale of its loss (the sum over levels)
        errs = {k: abs(ours[k] - theirs[k]) / scale[k] for k in ours}
        bound = {k: tol for k in ours}
    else:
        ex = {f"{key}.{lvl}": float(exact[0][key][lvl]) for key in ("loss_cls", "loss_bbox") for lvl in range(3)}
        if ins:
            ex["loss_mask"] = float(exact[0]["loss_mask"])
        errs = {k: abs(ours[k] - ex[k]) / scale[k] for k in ours}
        bound = {k: max(tol, factor * abs(theirs[k] - ex[k]) / scale[k]) for k in ours}
    print(name, "loss errors", {k: float(v) for k, v in errs.items()})
    assert all(errs[k] <= bound[k] for k in errs), (errs, bound)
    for i in range(len(crops)):  # the same positives
        if f"valid_flags_img{i}" in stages:
            v = stages[f"valid_flags_img{i}"].numpy()
            np.testing.assert_array_equal(np.asarray(st["valid"][i]), v)
            np.testing.assert_array_equal(np.asarray(st["assign"]["gt_inds"][i])[v],
                                          stages[f"assign_img{i}_gt_inds"].numpy())
    gtol = TOLERANCES["train.grad"].rtol
    rel = lambda a, b: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))  # noqa: E731
    if exact is None:
        errs = {k: rel(grads[k], g) for k, g in ref_grads.items()}
        bound = {k: gtol for k in ref_grads}
    else:
        errs = {k: rel(grads[k], exact[1][k]) for k in ref_grads}
        bound = {k: max(gtol, factor * rel(g, exact[1][k])) for k, g in ref_grads.items()}
    print(name, "worst gradients", sorted(errs.items(), key=lambda kv: -kv[1])[:3])
    bad = {k: (errs[k], bound[k]) for k in errs if errs[k] > bound[k]}
    assert len(errs) > 100 and not bad, bad
    btol = TOLERANCES["rtmdet.train.bn_stats"].rtol
    for k, want in ref_after.items():
        if k.endswith(("running_mean", "running_var")):
            if exact is None:
                assert rel(after[k], want) <= btol, k
            else:
                assert rel(after[k], exact[2][k]) <= max(btol, factor * rel(want, exact[2][k])), k
        elif k.endswith("num_batches_tracked"):
            assert int(after[k]) == int(want), k
    del model, ref
    jax.clear_caches()
    gc.collect()
