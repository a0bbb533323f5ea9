"""The recorded RTMDet / RTMDet-Ins training step (``goldens/rtmdet/<case>/train_step.npz``) replayed in flaxdet:
the batch rebuilt from the recorded crops, GT and metainfo, every BN in train mode, one jitted value_and_grad.
Shared by the golden test and ``flaxdet parity``-style tools; the assigner is deterministic (nothing injected)."""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from flaxdet.config import load_config
from flaxdet.data.transforms import pad_ground_truth
from flaxdet.models import build_detector
from flaxdet.nn import set_bn_training
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import export_visdet_state_dict, load_visdet_state_dict
from parity_tests.goldens import GOLDENS

CASES = ("rtmdet/rtmdet_tiny", "rtmdet/rtmdet_ins_tiny")


def golden_batch(z, max_gt=4):
    """The recorded batch as flaxdet's train batch: BGR crops zero-padded to the batch shape, padded GT."""
    n = sum(1 for k in z.files if k.endswith("_bgr_uint8"))
    hp, wp = (int(v) for v in z["meta_img0_batch_input_shape"])
    images = np.zeros((n, hp, wp, 3), np.uint8)
    gts = []
    for i in range(n):
        im = z[f"img{i}_bgr_uint8"]
        images[i, : im.shape[0], : im.shape[1]] = im
        masks = z[f"gt_img{i}_masks"] if f"gt_img{i}_masks" in z.files else None
        gts.append(dict(bboxes=z[f"gt_img{i}_bboxes"], labels=z[f"gt_img{i}_labels"], masks=masks))
    batch = dict(images=images,
                 img_shapes=np.stack([z[f"meta_img{i}_img_shape"] for i in range(n)]).astype(np.int32),
                 pad_shapes=np.stack([z[f"meta_img{i}_pad_shape"] for i in range(n)]).astype(np.int32))
    batch.update(pad_ground_truth(gts, max_gt, hp, wp))
    return batch


def flax_step(model, batch):
    """One jitted value_and_grad of ``model.loss`` with every BN in train mode: (logs, stages, gradients and the
    state after the step as visdet state dicts)."""
    set_bn_training(model, True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, batch):
        def inner(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            total, (logs, stages) = m.loss(batch, with_stages=True)
            return total, (logs, stages, nnx.split(m, nnx.Param, ...)[2])
        return jax.value_and_grad(inner, has_aux=True)(params)

    (_, (logs, stages, new_rest)), grads = step(params, rest, batch)
    return (logs, stages, export_visdet_state_dict(nnx.merge(graphdef, grads, rest)),
            export_visdet_state_dict(nnx.merge(graphdef, params, new_rest)))


@functools.lru_cache(maxsize=None)
def replay(case, emulate_kernel_index_bug=True):
    """(npz, logs, stages, grads {visdet key: torch-layout array}, state after the step {visdet key: array})."""
    z = np.load(GOLDENS / case / "train_step.npz")
    model = build_detector(load_config(GOLDENS / case / "config.yaml"))
    report = load_visdet_state_dict(model, load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict)
    assert report.ok, report.summary()
    if hasattr(model.bbox_head, "emulate_kernel_index_bug"):
        model.bbox_head.emulate_kernel_index_bug = emulate_kernel_index_bug
    logs, stages, grads_sd, after_sd = flax_step(model, golden_batch(z))
    logs = {k: float(v) for k, v in logs.items()}
    return z, logs, jax.tree.map(np.asarray, stages), grads_sd, after_sd
