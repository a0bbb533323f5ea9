"""reference/ reproduces the visdet RTMDet / RTMDet-Ins goldens (``rtmdet/rtmdet_tiny``, ``rtmdet/rtmdet_ins_tiny``):
strict loading of every weight file, then every recorded stage of all three photos.

Two regimes, as test_reference_goldens.py:
* teacher-forced -- each stage is fed the *recorded* output of the stage before it (backbone from the recorded
  input, neck from the recorded backbone, head from the recorded neck, post-processing from the recorded head
  outputs). The goldens' README guarantees every post-processing decision is >= 1.2e-4 from flipping, so the
  decisions (top-k, candidates, NMS keeps, detections) must be identical: no tie flips allowed;
* end to end -- the uint8 image in, every stage compared; near-tied candidates may swap ranks (tie flips are
  counted, see flaxdet.parity.match_ranked).
The RTMDet head outputs use the table's ``rtmdet_head`` (teacher-forced) and ``e2e.rtmdet_head`` rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flaxdet.config import load_config
from flaxdet.parity import (
    MASK_PIXELS_PER_IMAGE,
    MASK_PIXELS_TEACHER_FORCED,
    TIE_EPS,
    TOLERANCES,
    Row,
    Tol,
    compare_array,
    compare_detections,
    format_table,
    match_ranked,
)
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_reference import build_detector, load_detector
from flaxdet_reference.models import load_state_dict_strict
from parity_tests.goldens import IMAGES, WEIGHT_FILES, config_path, golden_image
from parity_tests.test_reference_goldens import model_for, t

pytestmark = pytest.mark.goldens

CASES = ("rtmdet/rtmdet_tiny", "rtmdet/rtmdet_ins_tiny")
HEAD, HEAD_E2E = TOLERANCES["rtmdet_head"], TOLERANCES["e2e.rtmdet_head"]  # the one table's RTMDet rows


def a(x):
    return x.numpy() if torch.is_tensor(x) else np.asarray(x)


def image_tensor(g):
    return t(g["input_bgr_uint8"]).permute(2, 0, 1).contiguous()


def is_ins(case):
    return "ins" in case


def head_names(case):
    return ("cls_scores", "bbox_preds") + (("kernel_preds",) if is_ins(case) else ())


def check(rows):
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n" + format_table(rows)


def compare_ranked(stage, ours: dict, theirs: dict, float_atol: float, score_atol: float, allow_flips: bool):
    """Rows of candidates in score order (every value an array with one row per candidate; ``scores`` required).
    A row agrees when its integer/bool fields are equal and its float fields within ``float_atol`` (scores:
    ``score_atol``); a disagreeing row is a tie flip iff the scores at that rank agree (match_ranked)."""
    n = len(theirs["scores"])
    if len(ours["scores"]) != n:
        return Row(stage, (n,), float("inf"), float("inf"), float_atol, False, f"{len(ours['scores'])} rows vs {n}")
    if n == 0:
        return Row(stage, (0,), 0.0, 0.0, float_atol, True, "empty")
    eq, err, serr = np.ones(n, bool), np.zeros(n), np.zeros(n)
    for k, want in theirs.items():
        got, want = a(ours[k]).reshape(n, -1), np.asarray(want).reshape(n, -1)
        if got.shape != want.shape:
            return Row(f"{stage}.{k}", want.shape, float("inf"), float("inf"), 0.0, False, f"shape {got.shape}")
        if want.dtype.kind == "f":
            e = np.abs(got.astype(np.float64) - want).max(1)
            eq &= e <= (score_atol if k == "scores" else float_atol)
            if k == "scores":
                serr = e
            else:
                err = np.maximum(err, e)
        else:
            eq &= (got == want).all(1)
    ok, flips, bad = match_ranked(a(ours["scores"]), theirs["scores"], eq, tie_eps=max(TIE_EPS, score_atol))
    ok = ok and (allow_flips or flips == 0)
    note = (f"{flips} tie flip(s); max |d score| {serr[eq].max() if eq.any() else 0:.3g}"
            + (f"; mismatched rows {bad[:10]}" if bad else ""))
    return Row(stage, (n,), float(err[eq].max()) if eq.any() else 0.0, 0.0, float_atol, ok, note,
               {"tie_flips": flips})


def post_processing_rows(g, stages, res, case, box_atol, score_atol, allow_flips, mask_pixels, logits_tol):
    """Every recorded post-processing step (topk, cand, rescale, min_size, nms_in, nms, det)."""
    rows = []
    topk = ("scores", "labels", "keep_idxs")
    for lvl in range(3):
        rows.append(compare_ranked(f"topk.{lvl}", {k: stages[f"topk.{lvl}.{k}"] for k in topk},
                                   {k: g[f"topk.{lvl}.{k}"] for k in topk}, 0.0, score_atol, allow_flips))
    cand = ("bboxes", "scores", "labels", "level") + (("priors",) if is_ins(case) else ())
    ours = {k: stages[f"cand.{k}"] for k in cand}
    ours.update({"rescale.bboxes": stages["rescale.bboxes"], "min_size.keep": stages["min_size.keep"]})
    theirs = {k: g[f"cand.{k}"] for k in cand}
    theirs.update({"rescale.bboxes": g["rescale.bboxes"], "min_size.keep": g["min_size.keep"]})
    rows.append(compare_ranked("cand+rescale+min_size", ours, theirs, box_atol, score_atol, allow_flips))
    rows.append(compare_array("rescale.factor", stages["rescale.factor"], g["rescale.factor"], Tol(0.0, "exact")))
    nms_in = ("bboxes", "scores", "labels")
    rows.append(compare_ranked("nms_in", {k: stages[f"nms_in.{k}"] for k in nms_in},
                               {k: g[f"nms_in.{k}"] for k in nms_in}, box_atol, score_atol, allow_flips))
    # NMS: the kept rows of nms_in (their keep index too, unless an earlier tie flip moved them)
    keep, tk = a(stages["nms.keep"]), g["nms.keep"]
    rows.append(compare_ranked(
        "nms", {"keep": keep, "scores": stages["nms.scores"], "bboxes": a(stages["nms_in.bboxes"])[keep],
                "labels": a(stages["nms_in.labels"])[keep]},
        {"keep": tk, "scores": g["nms.scores"], "bboxes": g["nms_in.bboxes"][tk], "labels": g["nms_in.labels"][tk]},
        box_atol, score_atol, allow_flips))
    det_keys = ("bboxes", "scores", "labels") + (("masks",) if is_ins(case) else ())
    det_rows = compare_detections("det", {k: a(res[k]) for k in det_keys}, {k: g[f"det.{k}"] for k in det_keys},
                                  box_atol=box_atol, score_atol=score_atol,
                                  mask_pixels=mask_pixels if is_ins(case) else None)
    if not allow_flips and det_rows[0].extra.get("tie_flips"):
        det_rows[0].passed = False
    rows += det_rows
    if is_ins(case) and len(res["bboxes"]) == len(g["det.bboxes"]):
        same = np.abs(a(res["bboxes"]) - g["det.bboxes"]).max(1) <= box_atol
        rows.append(compare_array("det.priors", a(res["priors"])[same], g["det.priors"][same], Tol(0.0, "exact")))
        rows.append(compare_array("det.kernels", a(res["kernels"])[same], g["det.kernels"][same], logits_tol))
        n = len(g["det.mask_logits_first16"])
        rows.append(compare_array("det.mask_logits_first16", a(stages["det.mask_logits_first16"])[same[:n]],
                                  g["det.mask_logits_first16"][same[:n]], logits_tol))
    return rows


@pytest.mark.parametrize("case", CASES)
def test_weights_load_strictly(case):
    """Every weight file loads with strict=True, shared head convs included (one module under three names)."""
    folder = config_path(case).parent
    for name in WEIGHT_FILES:
        sd = load_checkpoint(folder / name).state_dict
        m = load_state_dict_strict(build_detector(config_path(case)), sd, source=name)
        own = m.state_dict()
        assert set(own) == set(sd), name
        for k, v in sd.items():
            assert np.array_equal(own[k].numpy(), np.asarray(v)), f"{name}: {k}"
        head = m.bbox_head
        for lvl in (1, 2):
            for i in range(head.stacked_convs):
                for tower in (head.cls_convs, head.reg_convs):
                    assert tower[lvl][i].conv is tower[0][i].conv
                    assert tower[lvl][i].bn is not tower[0][i].bn
                    assert f"bbox_head.{'cls' if tower is head.cls_convs else 'reg'}_convs.{lvl}.{i}.conv.weight" \
                        in own
        if is_ins(case):
            assert head.reg_convs[0] is not head.cls_convs[0]
            assert head.kernel_convs[1][0].conv is not head.kernel_convs[0][0].conv
    model, classes = load_detector(config_path(case), folder / "checkpoint.pth")
    assert classes == [f"class_{i}" for i in range(model.bbox_head.num_classes)]


def test_presets_match_published_sizes():
    """Parameter and state-dict counts of the full-width presets (visdet-rtmdet.md section 1.1, 80 classes)."""
    want = {"rtmdet_tiny": (4896168, 476), "rtmdet_s": (8886924, 512), "rtmdet_ins_tiny": (5805227, 546)}
    for name, (params, keys) in want.items():
        cfg = load_config(name)
        cfg = dataclasses.replace(cfg, bbox_head=dataclasses.replace(cfg.bbox_head, num_classes=80))
        m = build_detector(cfg)
        assert (sum(p.numel() for p in m.parameters()), len(m.state_dict())) == (params, keys), name
    tied = dataclasses.replace(cfg, bbox_head=dataclasses.replace(cfg.bbox_head, tie_reg_to_cls=True))
    assert sum(p.numel() for p in build_detector(tied).parameters()) == 5638187  # upstream's 5.6 M


def test_tie_reg_to_cls():
    """Upstream's Ins architecture: reg_convs[l] *is* cls_convs[l]. A state dict whose reg tower equals its cls
    tower (what upstream checkpoints hold under both names) loads strictly into it and gives the same outputs
    as visdet's two-tower head holding the same weights."""
    case = "rtmdet/rtmdet_ins_tiny"
    cfg = load_config(config_path(case))
    sd = dict(load_checkpoint(config_path(case).parent / "state_dict.pth").state_dict)
    sd.update({k: sd[k.replace("reg_convs", "cls_convs")] for k in sd if k.startswith("bbox_head.reg_convs.")})
    tied = build_detector(dataclasses.replace(cfg, bbox_head=dataclasses.replace(cfg.bbox_head,
                                                                                 tie_reg_to_cls=True)))
    load_state_dict_strict(tied, sd)
    two = load_state_dict_strict(build_detector(cfg), sd)
    assert all(tied.bbox_head.reg_convs[lvl] is tied.bbox_head.cls_convs[lvl] for lvl in range(3))
    assert sum(p.numel() for p in tied.parameters()) < sum(p.numel() for p in two.parameters())
    g = golden_image(case, "color")
    neck = [t(g[f"neck.{i}"]) for i in range(3)]
    with torch.no_grad():
        for x, y in zip(tied.bbox_head(neck), two.bbox_head(neck)):
            for u, v in zip(*(([x], [y]) if torch.is_tensor(x) else (x, y))):
                assert torch.equal(u, v)


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_stages(case, image):
    g = golden_image(case, image)
    m = model_for(case)
    rows = []
    with torch.no_grad():
        batch, shape = m.data_preprocessor([image_tensor(g)])
        rows.append(compare_array("preprocessed", batch.numpy(), g["preprocessed"]))
        feats = m.backbone(t(g["preprocessed"]))
        rows += [compare_array(f"backbone.{i}", f.numpy(), g[f"backbone.{i}"]) for i, f in enumerate(feats)]
        neck = m.neck([t(g[f"backbone.{i}"]) for i in range(3)])
        rows += [compare_array(f"neck.{i}", f.numpy(), g[f"neck.{i}"]) for i, f in enumerate(neck)]
        outs = m.bbox_head([t(g[f"neck.{i}"]) for i in range(3)])
        for name, per_level in zip(head_names(case), outs):
            rows += [compare_array(f"{name}.{lvl}", o.numpy(), g[f"{name}.{lvl}"], HEAD) for lvl, o in
                     enumerate(per_level)]
        recorded = [[t(g[f"{name}.{lvl}"]) for lvl in range(3)] for name in head_names(case)]
        if is_ins(case):
            rows.append(compare_array("mask_feats", outs[3].numpy(), g["mask_feats"], HEAD))
            recorded.append(t(g["mask_feats"]))
        meta = dict(g.meta, batch_input_shape=shape)
        stages = {}
        res = m.bbox_head.predict_by_feat(*recorded, img_metas=[meta], rescale=True, stages=stages)[0]
        # visdet's Resize stores (w, h, w, h): accepted, the same result
        res4 = m.bbox_head.predict_by_feat(*recorded, img_metas=[dict(meta, scale_factor=meta["scale_factor"] * 2)],
                                           rescale=True)[0]
        assert all(torch.equal(res[k], res4[k]) for k in res)
        if is_ins(case):  # the dynamic convs alone, on the recorded kernels, priors and mask features
            n = len(g["det.mask_logits_first16"])
            logits = m.bbox_head._mask_predict_by_feat_single(t(g["mask_feats"][0]), t(g["det.kernels"][:n]),
                                                              t(g["det.priors"][:n]))
            rows.append(compare_array("mask_logits (recorded kernels)", logits.numpy(), g["det.mask_logits_first16"],
                                      HEAD))
    box_atol = TOLERANCES["det.bboxes"].rtol * max(g.meta["ori_shape"])
    rows += post_processing_rows(g, stages, res, case, box_atol, TOLERANCES["det.scores"].rtol, False,
                                 MASK_PIXELS_TEACHER_FORCED, HEAD)
    check(rows)


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("case", CASES)
def test_end_to_end(case, image):
    g = golden_image(case, image)
    m = model_for(case)
    stages = {}
    res = m.predict([image_tensor(g)], [g.meta], stages=stages)[0]
    rows = [compare_array(k, stages[k].numpy(), g[k]) for k in g.arrays if k.split(".")[0] in
            ("preprocessed", "backbone", "neck")]
    rows += [compare_array(k, stages[k].numpy(), g[k], HEAD_E2E) for k in g.arrays
             if k.split(".")[0] in head_names(case) + ("mask_feats",)]
    rows += post_processing_rows(g, stages, res, case, TOLERANCES["e2e.det.bboxes_px"].rtol,
                                 TOLERANCES["e2e.det.scores"].rtol, True, MASK_PIXELS_PER_IMAGE, HEAD_E2E)
    missing = set(g.arrays) - set(stages) - {"input_bgr_uint8"}
    assert not missing, f"stages not exposed by predict: {sorted(missing)}"
    check(rows)
