"""Replay visdet's recorded training step (../shared/goldens/train_tiny_r18) in flaxdet."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from flaxdet.training.forward import pad_ground_truth, rpn_anchor_flags
from parity_tests.goldens import GOLDENS, require_goldens

G_MAX = 8


def load_train_golden():
    require_goldens()
    d = GOLDENS / "train_tiny_r18"
    with np.load(d / "batch.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((d / "batch.json").read_text())


def _pad(a, cap):
    out, v = np.zeros(cap, np.int32), np.zeros(cap, bool)
    out[: len(a)], v[: len(a)] = a, True
    return out, v


def build_batch_and_injection(model, z):
    """(batch, inject): the recorded images/GT padded to static shapes, and visdet's sampled indices
    mapped to flaxdet's layouts (RPN: valid-anchor list -> all anchors; RCNN: [k GTs; proposals] ->
    [G_MAX padded GTs; proposals])."""
    n = 2
    hp, wp = (int(v) for v in z["meta_img0_batch_input_shape"])
    imgs = np.zeros((n, hp, wp, 3), np.uint8)
    gts = []
    for i in range(n):
        im = z[f"img{i}_bgr_chw"].transpose(1, 2, 0)
        imgs[i, : im.shape[0], : im.shape[1]] = im
        gts.append(dict(bboxes=z[f"gt_img{i}_bboxes"], labels=z[f"gt_img{i}_labels"], masks=z[f"gt_img{i}_masks"]))
    batch = dict(images=jnp.asarray(imgs),
                 img_shapes=jnp.asarray(np.stack([z[f"meta_img{i}_img_shape"] for i in range(n)]), jnp.int32),
                 pad_shapes=jnp.asarray(np.stack([z[f"meta_img{i}_pad_shape"] for i in range(n)]), jnp.int32))
    batch.update({k: jnp.asarray(v) for k, v in pad_ground_truth(gts, G_MAX, hp, wp).items()})
    strides = [s[0] for s in model.rpn_head.prior_generator.strides]
    sizes = [(int(np.ceil(hp / s)), int(np.ceil(wp / s))) for s in strides]
    rcfg = model.roi_head.cfg.train_cfg.sampler
    pcfg = model.rpn_head.cfg.train_cfg.sampler
    caps = {"rpn": (int(pcfg.num * pcfg.pos_fraction), pcfg.num), "rcnn": (int(rcfg.num * rcfg.pos_fraction), rcfg.num)}
    inject = {"rpn": {}, "rcnn": {}}
    for i in range(n):
        _, flags = rpn_anchor_flags(model.rpn_head, sizes, batch["pad_shapes"][i], batch["img_shapes"][i], -1)
        full = np.nonzero(np.asarray(flags))[0]
        k = len(gts[i]["labels"])
        maps = {"rpn": lambda a: full[a], "rcnn": lambda a: np.where(a < k, a, a - k + G_MAX)}
        for stage in ("rpn", "rcnn"):
            for part, cap in zip(("pos", "neg"), caps[stage]):
                idx, valid = _pad(maps[stage](z[f"{stage}_sample_img{i}_{part}_inds"]), cap)
                inject[stage].setdefault(f"{part}_inds", []).append(idx)
                inject[stage].setdefault(f"{part}_valid", []).append(valid)
    inject = {s: {k: jnp.asarray(np.stack(v)) for k, v in d.items()} for s, d in inject.items()}
    props = np.stack([z[f"train_proposals_img{i}_boxes"] for i in range(n)])
    inject["proposals"] = (jnp.asarray(props), jnp.ones(props.shape[:2], bool))
    return batch, inject
