"""Mask/Faster R-CNN training forward with visdet's semantics, static shapes, jit-able.

Glossary: N images per batch, G padded GT capacity per image (``gt_valid``), A anchors of all levels,
P proposals (``train_cfg.rpn_proposal.max_per_img``), S = Spos + Sneg sampled RoI rows per image
(``Spos = int(num * pos_fraction)``, ``Sneg = num``; only ``num`` of them are valid).

Losses follow visdet exactly (``anchor_head.loss_by_feat``, ``bbox_head.loss``,
``fcn_mask_head.loss_and_target``):

* RPN: sigmoid BCE per level and L1 per level, each / (avg_factor + eps) with
  avg_factor = sum over images of max(n_pos, 1) + max(n_neg, 1);
* RCNN: softmax CE / (#sampled + eps) (positives weighted by ``pos_weight`` > 0); L1 or SmoothL1 (per
  the head's ``loss_bbox``) on the GT-class deltas of positives / (#sampled + eps);
  accuracy (percent, all sampled rows; logged, not a loss);
* mask: BCE on the GT-class logits against RoIAlign-cropped GT masks (>= 0.5), mean over positives.

``inject`` replays sampled indices recorded from visdet (see ``parity_tests``); otherwise sampling
uses ``key``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flaxdet.models.roi_heads.standard_roi_head import bbox2roi
from flaxdet.ops import anchors as A
from flaxdet.ops.boxes import encode_deltas
from flaxdet.ops.roi_align import roi_align
from flaxdet.training.targets import max_iou_assign, random_sample

EPS = float(np.finfo(np.float32).eps)


def rpn_anchor_flags(rpn_head, featmap_sizes, pad_shape, img_shape, allowed_border):
    """(A, 4) anchors (static) and (A,) inside flags for one image (traced pad/img shapes)."""
    gen = rpn_head.prior_generator
    anchors = np.concatenate(gen.grid_priors(featmap_sizes))
    flags = []
    for lvl, (fh, fw) in enumerate(featmap_sizes):
        sw, sh = gen.strides[lvl]
        vh = jnp.minimum(jnp.ceil(pad_shape[0] / sh).astype(jnp.int32), fh)
        vw = jnp.minimum(jnp.ceil(pad_shape[1] / sw).astype(jnp.int32), fw)
        v = (jnp.arange(fh)[:, None] < vh) & (jnp.arange(fw)[None, :] < vw)
        flags.append(jnp.repeat(v.reshape(-1), gen.num_base_priors[lvl]))
    flags = jnp.concatenate(flags)
    if allowed_border >= 0:
        a = jnp.asarray(anchors)
        flags = flags & (a[:, 0] >= -allowed_border) & (a[:, 1] >= -allowed_border) \
            & (a[:, 2] < img_shape[1] + allowed_border) & (a[:, 3] < img_shape[0] + allowed_border)
    return jnp.asarray(anchors), flags


def _sample_rows(sample):
    inds = jnp.concatenate([sample["pos_inds"], sample["neg_inds"]])
    valid = jnp.concatenate([sample["pos_valid"], sample["neg_valid"]])
    is_pos = jnp.concatenate([sample["pos_valid"], jnp.zeros_like(sample["neg_valid"])])
    return inds, valid, is_pos


def rpn_targets_single(anchors, flags, gt_boxes, gt_valid, cfg, coder, key, inject=None):
    a = cfg.assigner
    assigned, _ = max_iou_assign(anchors, flags, gt_boxes, gt_valid, a.pos_iou_thr, a.neg_iou_thr,
                                 a.min_pos_iou, a.match_low_quality, a.gt_max_assign_all)
    s = cfg.sampler
    sample = random_sample(assigned, s.num, s.pos_fraction, s.neg_pos_ub, key, inject)
    n = anchors.shape[0]
    pw = 1.0 if cfg.pos_weight <= 0 else float(cfg.pos_weight)  # visdet: train_cfg.pos_weight (> 0 overrides 1)
    label_w = jnp.zeros(n).at[sample["neg_inds"]].max(sample["neg_valid"].astype(jnp.float32))
    label_w = label_w.at[sample["pos_inds"]].max(sample["pos_valid"] * pw)
    pos = jnp.zeros(n, bool).at[sample["pos_inds"]].max(sample["pos_valid"])
    gt_for = gt_boxes[jnp.clip(assigned - 1, 0)]
    targets = encode_deltas(anchors, gt_for, coder.target_means, coder.target_stds)
    targets = jnp.where(pos[:, None], targets, 0.0)
    n_pos = sample["pos_valid"].sum()
    n_neg = sample["neg_valid"].sum()
    avg = jnp.maximum(n_pos, 1) + jnp.maximum(n_neg, 1)
    labels = jnp.where(pos, 0, 1)  # foreground class 0, background = num_classes (1)
    return dict(labels=labels, label_weights=label_w, bbox_targets=targets,
                bbox_weights=jnp.broadcast_to(pos[:, None], targets.shape).astype(jnp.float32),
                avg_factor=avg, assigned=assigned, sample=sample)


def bce_with_logits(x, t):
    # torch: max(x, 0) - x * t + log1p(exp(-|x|))
    return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def reg_loss(pred, target, loss_cfg):
    """Element-wise box regression loss of ``loss_cfg``: L1Loss, or SmoothL1Loss with its ``beta``
    (visdet: ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``)."""
    d = jnp.abs(pred - target)
    if loss_cfg.TYPE == "L1Loss":
        return d
    if loss_cfg.TYPE == "SmoothL1Loss":
        beta = float(loss_cfg.beta)
        if beta <= 0:
            raise ValueError(f"SmoothL1Loss needs beta > 0, got {beta}")
        return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    raise ValueError(f"box loss {loss_cfg.TYPE!r} is not supported in training (L1Loss, SmoothL1Loss)")


def cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], -1)[..., 0]


def rpn_loss(model, cls_scores, bbox_preds, batch, key, inject=None):
    head = model.rpn_head
    cfg = head.cfg.train_cfg
    sizes = [c.shape[1:3] for c in cls_scores]
    n = cls_scores[0].shape[0]
    keys = jax.random.split(key, n)

    def one(pad_shape, img_shape, gtb, gtv, k, inj):
        anchors, flags = rpn_anchor_flags(head, sizes, pad_shape, img_shape, cfg.allowed_border)
        return rpn_targets_single(anchors, flags, gtb, gtv, cfg, head.cfg.bbox_coder, k, inj)

    inj = None if inject is None else inject.get("rpn")  # parts may be injected alone
    t = jax.vmap(one)(batch["pad_shapes"], batch["img_shapes"], batch["gt_bboxes"], batch["gt_valid"], keys, inj)
    avg = t["avg_factor"].sum().astype(jnp.float32)
    cls = jnp.concatenate([c.reshape(n, -1) for c in cls_scores], 1)  # (N, A), order (lvl, y, x, a)
    reg = jnp.concatenate([r.reshape(n, -1, 4) for r in bbox_preds], 1)
    target = (t["labels"] == 0).astype(cls.dtype)
    cls_l = bce_with_logits(cls, target) * t["label_weights"]
    reg_l = reg_loss(reg, t["bbox_targets"], head.cfg.loss_bbox) * t["bbox_weights"]
    bounds = np.cumsum([0] + [int(np.prod(s)) * head.prior_generator.num_base_priors[i] for i, s in enumerate(sizes)])
    per_cls = [cls_l[:, a:b].sum() / (avg + EPS) for a, b in zip(bounds[:-1], bounds[1:])]
    per_reg = [reg_l[:, a:b].sum() / (avg + EPS) for a, b in zip(bounds[:-1], bounds[1:])]
    return per_cls, per_reg, t


def rcnn_sample(model, proposals, prop_valid, batch, key, inject=None, rh=None):
    """Per image: candidates [GT (G); proposals (P)], assignment, sampling -> sampled rows. ``rh``: the
    RoI head to use (default ``model.roi_head``; a cascade stage's view, flaxdet.training.cascade)."""
    rh = model.roi_head if rh is None else rh
    cfg = rh.cfg.train_cfg
    g = batch["gt_bboxes"].shape[1]
    keys = jax.random.split(key, proposals.shape[0])

    def one(props, pv, gtb, gtl, gtv, k, inj):
        a = cfg.assigner
        assigned_p, _ = max_iou_assign(props, pv, gtb, gtv, a.pos_iou_thr, a.neg_iou_thr, a.min_pos_iou,
                                       a.match_low_quality, a.gt_max_assign_all)
        if cfg.sampler.add_gt_as_proposals:
            cands = jnp.concatenate([gtb, props])
            assigned = jnp.concatenate([jnp.where(gtv, jnp.arange(1, g + 1), -1), assigned_p])
            is_gt = jnp.concatenate([gtv, jnp.zeros_like(pv)])
        else:
            cands, assigned, is_gt = props, assigned_p, jnp.zeros_like(pv)
        s = cfg.sampler
        sample = random_sample(assigned, s.num, s.pos_fraction, s.neg_pos_ub, k, inj)
        inds, valid, is_pos = _sample_rows(sample)
        gt_idx = jnp.clip(assigned[inds] - 1, 0)
        labels = jnp.where(is_pos, gtl[gt_idx], rh.bbox_head.num_classes)
        return dict(rois=cands[inds], valid=valid, is_pos=is_pos, gt_idx=gt_idx, labels=labels,
                    is_gt=is_gt[inds], assigned=assigned, inds=inds)

    inj = None if inject is None else inject.get("rcnn")
    return jax.vmap(one)(proposals, prop_valid, batch["gt_bboxes"], batch["gt_labels"], batch["gt_valid"], keys, inj)


def rcnn_loss(model, neck, s, batch, rh=None):
    rh = model.roi_head if rh is None else rh
    head = rh.bbox_head
    n, rows = s["valid"].shape
    rois = bbox2roi(s["rois"])
    roi_feats, cls, reg = rh.bbox_forward(neck, rois)
    valid = s["valid"].reshape(-1)
    is_pos = s["is_pos"].reshape(-1)
    labels = s["labels"].reshape(-1)
    w = valid.astype(cls.dtype)
    count = w.sum()  # visdet's avg_factor: rows with label weight > 0, whatever pos_weight is
    pw = rh.cfg.train_cfg.pos_weight
    label_w = jnp.where(is_pos, w * pw, w) if pw > 0 else w
    loss_cls = (cross_entropy(cls, labels) * label_w).sum() / (jnp.maximum(count, 1.0) + EPS)
    acc = 100.0 * ((jnp.argmax(cls, -1) == labels) * w).sum() / jnp.maximum(count, 1.0)
    bc = head.cfg.bbox_coder
    gtb = jnp.take_along_axis(batch["gt_bboxes"], s["gt_idx"][..., None], 1).reshape(-1, 4)
    targets = encode_deltas(rois[:, 1:], gtb, bc.target_means, bc.target_stds)
    targets = jnp.where(is_pos[:, None], targets, 0.0)
    if head.cfg.reg_class_agnostic:
        pred = reg.reshape(-1, 4)
    else:
        pred = jnp.take_along_axis(reg.reshape(-1, head.num_classes, 4),
                                   jnp.clip(labels, 0, head.num_classes - 1)[:, None, None], 1)[:, 0]
    loss_bbox = (reg_loss(pred, targets, head.cfg.loss_bbox) * is_pos[:, None]).sum() / (count + EPS)
    stages = dict(rcnn_rois=rois, rcnn_roi_feats=roi_feats, rcnn_cls_score=cls, rcnn_bbox_pred=reg,
                  rcnn_target_bbox_targets=targets)
    return dict(loss_cls=head.cfg.loss_cls.loss_weight * loss_cls, acc=acc,
                loss_bbox=head.cfg.loss_bbox.loss_weight * loss_bbox), stages


def sampler_spos(rh):
    """Spos: the sampled rows per image that can be positive (``int(num * pos_fraction)``)."""
    return int(rh.cfg.train_cfg.sampler.num * rh.cfg.train_cfg.sampler.pos_fraction)


def mask_loss(model, neck, s, batch, rh=None, rows=None):
    """Positive rows only: the first Spos sampled rows of each image hold its positives (``is_pos``).

    visdet runs the mask branch on the positives it has (often a handful per image); at a static
    Spos rows per image the mask head would cost that of Spos every step (4 3x3 convs of 256
    channels at 14x14: ~2.3 s forward for 256 rows on 2 CPU cores, backward twice that). So the
    RoIAligns (features and GT-mask targets) skip non-positive rows, and the mask head and its loss
    run on the first ``rows`` rows per image (static; None: all Spos). The caller picks ``rows``
    from the positives of earlier steps (``TrainState``); returned ``need`` is the rows this step's
    positives take: with ``need > rows`` the positives past ``rows`` were left out, and the caller
    must re-run the step with more rows (rows past ``rows`` count for nothing; stage arrays are
    padded back to Spos rows per image). The row count is a static shape, not a ``lax.switch``:
    XLA:CPU runs ops inside conditional branches several times slower."""
    rh = model.roi_head if rh is None else rh
    spos = sampler_spos(rh)
    k = spos if rows is None else min(int(rows), spos)
    n = s["valid"].shape[0]
    size = rh.cfg.train_cfg.mask_size
    boxes, pos_valid = s["rois"][:, :spos], s["is_pos"][:, :spos]
    need = jnp.max(jnp.where(pos_valid, jnp.arange(1, spos + 1), 0))  # rows per image holding every positive
    # only the first k rows per image from here on: the rest would be zeros (RoIAlign's valid mask)
    boxes_k, pv_k = boxes[:, :k], pos_valid[:, :k]
    pv = pv_k.reshape(-1)
    mask_rois = bbox2roi(boxes_k)
    roi_feats = rh.mask_roi_extractor(neck, mask_rois, valid=pv)  # (N*k, 14, 14, C), zeros off positives
    masks = batch["gt_masks"]  # (N, G, Hp, Wp)
    g, hp, wp = masks.shape[1:]
    clipped = jnp.stack([jnp.clip(boxes_k[..., 0], 0, wp), jnp.clip(boxes_k[..., 1], 0, hp),
                         jnp.clip(boxes_k[..., 2], 0, wp), jnp.clip(boxes_k[..., 3], 0, hp)], -1)
    gt_flat = (jnp.arange(n)[:, None] * g + s["gt_idx"][:, :k]).reshape(-1, 1).astype(clipped.dtype)
    crops = roi_align(masks.reshape(n * g, hp, wp, 1).astype(jnp.float32),
                      jnp.concatenate([gt_flat, clipped.reshape(-1, 4)], 1), size, 1.0, 0, True, valid=pv)[..., 0]
    targets = (crops >= 0.5).astype(roi_feats.dtype)
    logits = rh.mask_head(roi_feats)
    lab = jnp.clip(s["labels"][:, :k].reshape(-1), 0, logits.shape[-1] - 1)  # non-positive rows: any channel
    logits = jnp.take_along_axis(logits, lab[:, None, None, None], -1)[..., 0]  # (N*k, 28, 28)
    total = (bce_with_logits(logits, targets) * pv.astype(logits.dtype)[:, None, None]).sum()
    loss = total / jnp.maximum(pv.sum().astype(total.dtype) * size * size, 1.0)

    def pad(a):  # (N*k, ...) -> (N*Spos, ...), zeros past row k of each image
        a = a.reshape(n, k, *a.shape[1:])
        return jnp.pad(a, [(0, 0), (0, spos - k)] + [(0, 0)] * (a.ndim - 2)).reshape(n * spos, *a.shape[2:])

    stages = dict(mask_rois=bbox2roi(boxes), mask_roi_feats=pad(roi_feats), mask_preds_sel=pad(logits),
                  mask_targets=pad(targets), mask_valid=pad(pv.reshape(-1, 1))[:, 0])
    return rh.mask_head.cfg.loss_mask.loss_weight * loss, stages, need


def loss_fn(model, batch, key, inject=None, with_stages=False, mask_rows=None):
    """Total loss and visdet's log dict (loss_rpn_cls, loss_rpn_bbox, loss_cls, acc, loss_bbox, loss_mask, loss).
    ``mask_rows`` (static): the mask branch's rows per image (see :func:`mask_loss`; None: all Spos);
    when set, the logs also hold ``mask_rows_needed`` (int32, the most any mask branch needed)."""
    x = model.data_preprocessor(batch["images"], batch["img_shapes"])
    bcfg = model.backbone.cfg
    stochastic = any(getattr(bcfg, f, 0) > 0 for f in ("drop_path_rate", "drop_rate", "attn_drop_rate"))
    _, neck = model.extract_feat(x, jax.random.fold_in(key, 0x5717) if stochastic else None)  # Swin drop-path
    cls, reg = model.rpn_head(neck)
    k1, k2 = jax.random.split(key)
    per_cls, per_reg, rpn_t = rpn_loss(model, cls, reg, batch, k1, inject)
    rpn_w = model.rpn_head.cfg
    logs = dict(loss_rpn_cls=rpn_w.loss_cls.loss_weight * sum(per_cls),
                loss_rpn_bbox=rpn_w.loss_bbox.loss_weight * sum(per_reg))
    pcfg = model.cfg.train_cfg.rpn_proposal
    sg = jax.lax.stop_gradient
    pb, ps, pv = model.rpn_head.predict_by_feat([sg(c) for c in cls], [sg(r) for r in reg], batch["img_shapes"], pcfg)
    if inject is not None and "proposals" in inject:  # teacher forcing: visdet's own train proposals
        pb, pv = inject["proposals"]
    if getattr(model.roi_head, "num_stages", None) is not None:  # Cascade R-CNN: s{k}.* losses per stage
        from flaxdet.training.cascade import cascade_rcnn_losses

        rl, stages, s, need = cascade_rcnn_losses(model, neck, pb, pv, batch, k2, inject, mask_rows)
        logs.update(rl)
    else:
        s = rcnn_sample(model, pb, pv, batch, k2, inject)
        rl, stages = rcnn_loss(model, neck, s, batch)
        logs.update(rl)
        need = jnp.zeros((), jnp.int32)
        if model.roi_head.with_mask:
            logs["loss_mask"], ms, need = mask_loss(model, neck, s, batch, rows=mask_rows)
            stages.update(ms)
    total = sum(v for k, v in logs.items() if "loss" in k)
    logs["loss"] = total
    if mask_rows is not None:
        logs["mask_rows_needed"] = need.astype(jnp.int32)
    if with_stages:
        stages.update(train_proposals_boxes=pb, train_proposals_scores=ps, train_proposals_valid=pv,
                      rpn_per_level_cls=jnp.stack(per_cls), rpn_per_level_bbox=jnp.stack(per_reg),
                      rpn_avg_factor=rpn_t["avg_factor"].sum(), rpn_assigned=rpn_t["assigned"],
                      rcnn_assigned=s["assigned"], rcnn_sample_rows=s["inds"], rcnn_sample_valid=s["valid"])
        return total, (logs, stages)
    return total, logs


def pad_ground_truth(gts, g_max, hp, wp):
    """Host side: list of dicts (bboxes (k,4), labels (k,), masks (k,h,w) or None) -> padded arrays."""
    n = len(gts)
    boxes = np.zeros((n, g_max, 4), np.float32)
    labels = np.zeros((n, g_max), np.int32)
    valid = np.zeros((n, g_max), bool)
    masks = np.zeros((n, g_max, hp, wp), np.uint8)
    for i, gt in enumerate(gts):
        k = len(gt["bboxes"])
        if k > g_max:
            raise ValueError(f"image {i} has {k} GT boxes > capacity {g_max}; raise max_gt")
        boxes[i, :k] = gt["bboxes"]
        labels[i, :k] = gt["labels"]
        valid[i, :k] = True
        if gt.get("masks") is not None and k:
            m = np.asarray(gt["masks"])
            masks[i, :k, : m.shape[1], : m.shape[2]] = m
    return dict(gt_bboxes=boxes, gt_labels=labels, gt_valid=valid, gt_masks=masks)


def own_pad_shape(img_shape, divisor=32):
    return tuple(int(math.ceil(s / divisor)) * divisor for s in img_shape[:2])
