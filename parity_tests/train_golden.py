"""Replay visdet's recorded training step (../shared/goldens/train_tiny_r18) in flaxdet, and the shared
mapping of sampled indices from visdet's index spaces into flaxdet's padded layouts.

visdet (and reference/) index spaces, per image: RPN samples index the image's list of *valid* anchors
(all levels concatenated, only those inside its own pad_shape); RCNN samples index ``[its k GTs;
its proposals]``. flaxdet's: RPN indexes all anchors; RCNN indexes ``[G padded GT slots; P proposal
slots]``.
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from flaxdet.data.transforms import pad_ground_truth
from parity_tests.goldens import GOLDENS, require_goldens

G_MAX = 8


def load_train_golden():
    require_goldens()
    d = GOLDENS / "train_tiny_r18"
    with np.load(d / "batch.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((d / "batch.json").read_text())


def _pad(a, cap):
    a = np.asarray(a).reshape(-1)
    if len(a) > cap:
        raise ValueError(f"{len(a)} sampled indices > capacity {cap}")
    out, v = np.zeros(cap, np.int32), np.zeros(cap, bool)
    out[: len(a)], v[: len(a)] = a, True
    return out, v


def flaxdet_batch(images, img_shapes, gts, g_max, batch_hw, pad_size_divisor=32):
    """images: uint8 (h, w, 3) arrays of any sizes; gts: per image dict(bboxes, labels, masks) ->
    flaxdet's static training batch padded to ``batch_hw`` (own pad_shape: img_shape rounded up to the divisor)."""
    hp, wp = batch_hw
    imgs = np.zeros((len(images), hp, wp, 3), np.uint8)
    for i, im in enumerate(images):
        imgs[i, : im.shape[0], : im.shape[1]] = im
    img_shapes = np.asarray(img_shapes, np.int32).reshape(-1, 2)
    batch = dict(images=jnp.asarray(imgs), img_shapes=jnp.asarray(img_shapes),
                 pad_shapes=jnp.asarray(-(-img_shapes // pad_size_divisor) * pad_size_divisor, jnp.int32))
    batch.update({k: jnp.asarray(v) for k, v in pad_ground_truth(gts, g_max, hp, wp).items()})
    return batch


def flaxdet_injection(model, batch, samples, num_gts, proposals=None, rcnn_train_cfg=None):
    """samples: dict(rpn=[(pos, neg) per image], rcnn=[(pos, neg) per image]) in visdet's index spaces
    (module doc); proposals: per image (P_i, 4) arrays or None; ``rcnn_train_cfg``: the RoI stage's train
    config (default: the Standard RoI head's). Returns flaxdet's ``inject``."""
    g_max = batch["gt_bboxes"].shape[1]
    hp, wp = batch["images"].shape[1:3]
    strides = [s[0] for s in model.rpn_head.prior_generator.strides]
    sizes = [(int(np.ceil(hp / s)), int(np.ceil(wp / s))) for s in strides]
    rcfg = (rcnn_train_cfg or model.roi_head.cfg.train_cfg).sampler
    pcfg = model.rpn_head.cfg.train_cfg.sampler
    caps = {"rpn": (int(pcfg.num * pcfg.pos_fraction), pcfg.num), "rcnn": (int(rcfg.num * rcfg.pos_fraction), rcfg.num)}
    inject = {"rpn": {}, "rcnn": {}}
    for i, k in enumerate(num_gts):
        _, flags = model.rpn_head.anchors_and_flags(sizes, batch["pad_shapes"][i], batch["img_shapes"][i])
        full = np.nonzero(np.asarray(flags))[0]
        maps = {"rpn": lambda a, full=full: full[np.asarray(a, np.int64)],
                "rcnn": lambda a, k=k: np.where(np.asarray(a) < k, a, np.asarray(a) - k + g_max)}
        for stage in ("rpn", "rcnn"):
            for part, cap, idx in zip(("pos", "neg"), caps[stage], samples[stage][i]):
                idx, valid = _pad(maps[stage](idx), cap)
                inject[stage].setdefault(f"{part}_inds", []).append(idx)
                inject[stage].setdefault(f"{part}_valid", []).append(valid)
    inject = {s: {k: jnp.asarray(np.stack(v)) for k, v in d.items()} for s, d in inject.items()}
    if proposals is not None:
        cap = max([model.cfg.train_cfg.rpn_proposal.max_per_img] + [len(p) for p in proposals])
        boxes, valid = np.zeros((len(proposals), cap, 4), np.float32), np.zeros((len(proposals), cap), bool)
        for i, p in enumerate(proposals):
            boxes[i, : len(p)], valid[i, : len(p)] = np.asarray(p)[:, :4], True
        inject["proposals"] = (jnp.asarray(boxes), jnp.asarray(valid))
    return inject


def build_batch_and_injection(model, z):
    """(batch, inject): the recorded images/GT padded to static shapes, and visdet's sampled indices
    and train-mode proposals mapped to flaxdet's layouts."""
    n = 2
    hp, wp = (int(v) for v in z["meta_img0_batch_input_shape"])
    images = [z[f"img{i}_bgr_chw"].transpose(1, 2, 0) for i in range(n)]
    gts = [dict(bboxes=z[f"gt_img{i}_bboxes"], labels=z[f"gt_img{i}_labels"], masks=z[f"gt_img{i}_masks"])
           for i in range(n)]
    batch = flaxdet_batch(images, [z[f"meta_img{i}_img_shape"] for i in range(n)], gts, G_MAX, (hp, wp))
    assert np.array_equal(np.asarray(batch["pad_shapes"]), np.stack([z[f"meta_img{i}_pad_shape"] for i in range(n)]))
    samples = {s: [(z[f"{s}_sample_img{i}_pos_inds"], z[f"{s}_sample_img{i}_neg_inds"]) for i in range(n)]
               for s in ("rpn", "rcnn")}
    inject = flaxdet_injection(model, batch, samples, [len(g["labels"]) for g in gts],
                               [z[f"train_proposals_img{i}_boxes"] for i in range(n)])
    return batch, inject
