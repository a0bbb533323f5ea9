"""Cascade R-CNN training losses (visdet ``CascadeRoIHead.loss``), static shapes, jit-able.

Stage k assigns and samples with ``train_cfg[k]`` (``forward.rcnn_sample`` with the GTs prepended as
candidates), computes ``forward.rcnn_loss`` / ``forward.mask_loss`` with ``bbox_head.k`` / ``mask_head.k``,
logs them as ``s{k}.{name}`` weighted by ``stage_loss_weights[k]`` (``acc`` is not weighted), and hands
its sampled rows, regressed without gradient, to stage k+1 as proposals. Refinement follows MMDetection
3.x ``BBoxHead.refine_bboxes`` (visdet's own training path crashes there, see
``flaxdet_reference.models.roi_heads.cascade_roi_head``): positives regress with their GT class,
negatives with the argmax foreground class, clipped to ``img_shape``; positives that were GT boxes are
dropped. Static shapes: stage k+1's proposals are stage k's S sampled rows (N, S, 4), the dropped and
padded rows marked invalid -- their valid rows in visdet's order ([positives; negatives]).

``inject["rcnn"]``: one sampler injection per stage (a list), each like the Standard path's.
"""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp

from flaxdet.models.roi_heads.cascade_roi_head import regress_by_class
from flaxdet.training.forward import mask_loss, rcnn_loss, rcnn_sample


class StageView:
    """Stage ``k`` of a CascadeRoIHead, shaped like a StandardRoIHead for forward.py's RCNN functions."""

    def __init__(self, head, k):
        self.cfg = SimpleNamespace(train_cfg=head.cfg.train_cfg[k])
        self.bbox_head = head.bbox_head[k]
        self.with_mask = head.with_mask
        if head.with_mask:
            self.mask_roi_extractor = head.mask_roi_extractor[k]
            self.mask_head = head.mask_head[k]
        self._head, self._k = head, k

    def bbox_forward(self, feats, rois):
        return self._head.bbox_forward(self._k, feats, rois)



def refine_sampled(bbox_head, s, cls, reg, img_shapes):
    """Stage k's sampled rows ``s`` (rcnn_sample) + its head outputs -> next proposals (N, S, 4), valid."""
    n, rows = s["valid"].shape
    sg = jax.lax.stop_gradient
    cls = sg(cls).reshape(n, rows, -1)
    reg = sg(reg).reshape(n, rows, -1)
    nc = bbox_head.num_classes
    labels = jnp.where(s["labels"] == nc, jnp.argmax(cls[..., :-1], -1), s["labels"])
    boxes = jax.vmap(lambda b, lab, r, sh: regress_by_class(bbox_head, b, lab, r, sh))(s["rois"], labels, reg, img_shapes)
    return sg(boxes), s["valid"] & ~(s["is_pos"] & s["is_gt"])


def cascade_rcnn_losses(model, neck, proposals, prop_valid, batch, key, inject=None, mask_rows=None):
    """Returns (logs ``s{k}.*``, stages (``s{k}.``-prefixed, stage 0 also unprefixed), stage 0's sample,
    the mask rows per image the stages needed (``forward.mask_loss``; 0 without masks))."""
    rh = model.roi_head
    keys = jax.random.split(key, rh.num_stages)
    logs, stages, first, need = {}, {}, None, jnp.zeros((), jnp.int32)
    pb, pv = proposals, prop_valid
    for k in range(rh.num_stages):
        view = StageView(rh, k)
        w = rh.cfg.stage_loss_weights[k]
        rc = None if inject is None else inject.get("rcnn")  # parts may be injected alone (forward.py)
        inj = None if rc is None else dict(rcnn=rc[k])
        s = rcnn_sample(model, pb, pv, batch, keys[k], inj, rh=view)
        rl, st = rcnn_loss(model, neck, s, batch, rh=view)
        for name, v in rl.items():
            logs[f"s{k}.{name}"] = v * w if "loss" in name else v
        if rh.with_mask:
            lm, ms, nk = mask_loss(model, neck, s, batch, rh=view, rows=mask_rows)
            need = jnp.maximum(need, nk)
            logs[f"s{k}.loss_mask"] = lm * w
            st.update(ms)
        st.update(proposals=pb, proposals_valid=pv, rcnn_assigned=s["assigned"], rcnn_sample_rows=s["inds"],
                  rcnn_sample_valid=s["valid"], rcnn_is_pos=s["is_pos"], rcnn_is_gt=s["is_gt"])
        stages.update({f"s{k}.{name}": v for name, v in st.items()})
        if k == 0:
            first = s
            stages.update({name: v for name, v in st.items() if not name.startswith(("proposals", "rcnn_is"))})
        if k < rh.num_stages - 1:
            pb, pv = refine_sampled(view.bbox_head, s, st["rcnn_cls_score"], st["rcnn_bbox_pred"], batch["img_shapes"])
    return logs, stages, first, need
