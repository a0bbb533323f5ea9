"""RTMDetInsHead / RTMDetInsSepBNHead and MaskFeatModule (visdet ``models/dense_heads/rtmdet_ins_head.py``): the
towers, the kernel branch, the mask features, the dynamic-conv masks and their post-processing, and the training
losses (RTMDetHead's plus the Dice mask loss, :meth:`RTMDetInsHead.loss_mask_by_feat`).

Shapes (NHWC; level l = 0, 1, 2 with stride s_l = 8, 16, 32; Hp, Wp = the padded input; h, w = Hp / 8, Wp / 8;
G = num_gen_params (169 for 8 prototypes, 8 dyconv channels, 3 dyconvs); D = test_cfg.max_per_img):
  feats[l]        (N, H_l, W_l, in_channels)
  cls_scores[l]   (N, H_l, W_l, C) logits;  bbox_preds[l] (N, H_l, W_l, 4) = relu(rtm_reg) * s_l (SepBN)
  kernel_preds[l] (N, H_l, W_l, G)          dynamic-conv parameters [w0 | w1 | w2 | b0 | b1 | b2]
  mask_feat       (N, h, w, num_prototypes)
  det.kernels (N, D, G), det.priors (N, D, 4) = (x, y, stride, stride), det.mask_logits (N, D, h, w)
  dets.masks      (N, D, Hc, Wc) bool: canvas_hw = (Hc, Wc) >= the original size with ``rescale``, else (Hp, Wp)

Mask of a detection with prior (px, py, s) (visdet-rtmdet.md §1.5): on the stride-8 grid g = (8j, 8i),
``x = [(p - g) / (8 s) (x, y), mask_feat]``, then ``relu(W0 x + b0)``, ``relu(W1 . + b1)``, ``W2 . + b2``.
Post-processing (§3.6, the intended 2-value rescale): logits bilinear x8 (``align_corners=False``) to (Hp, Wp);
with ``rescale`` bilinear again to ``(ceil(Hp / sw), ceil(Wp / sh))`` (the height from the *width* factor, as
visdet/upstream), cropped to the original size; ``sigmoid > mask_thr_binary`` (strict). Both resizes reproduce
torch's CPU ``upsample_bilinear2d`` arithmetic (:func:`linear_taps`, :func:`resize_bilinear`). The second one's
size depends on the traced scale factor, so it is evaluated on the static canvas: pixels past that size are False,
the caller crops to the original size (``flaxdet.inference.unpad``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet import fast_paths
from flaxdet.fast_paths.image_loop import per_image
from flaxdet.fast_paths.mask_resize_lanes import masks_in_lanes
from flaxdet.models.dense_heads.rtmdet_head import RTMDetHead
from flaxdet.models.layers import ConvModule
from flaxdet.models.losses import EPS, dice_loss
from flaxdet.models.task_modules.assigners.dynamic_soft_label_assigner import center_of_mass
from flaxdet.nn import PRECISION, Conv2d, Sequential, exact_div, relu


# ---------------------------------------------------------------------------------------- bilinear (torch CPU)
def linear_taps(in_size: int, out_size, n_out: int, scale_factor=None):
    """F.interpolate(mode='bilinear', align_corners=False) along one axis as torch's CPU kernel computes it
    (``compute_source_index_and_lambda``, float32): for ``n_out`` output positions the input indices i0, i1 and
    weights w0, w1, ``out = x[i0] * w0 + x[i1] * w1``. Ratio ``1 / scale_factor`` when given, else in / out;
    ``src = max(ratio * (dst + 0.5) - 0.5, 0)``, ``i0 = min(floor(src), in - 1)``, ``w1 = clip(src - i0, 0, 1)``,
    ``i1 = i0 + (i0 < in - 1)``; an output as large as the input is a copy. ``out_size`` may be traced (then the
    taps are; positions past it are computed anyway and left to the caller)."""
    traced = isinstance(out_size, jax.Array)
    xp, f32 = (jnp if traced else np), np.float32
    dst = xp.arange(n_out, dtype=f32)
    if scale_factor is not None:
        ratio = f32(1.0 / scale_factor)
    elif traced:
        ratio = exact_div(f32(in_size), out_size.astype(f32))
    else:
        ratio = f32(in_size) / f32(out_size)
    src = ratio * (dst + f32(0.5)) - f32(0.5)
    src = xp.where(src < 0, f32(0), src)
    i0 = xp.minimum(xp.floor(src).astype(np.int32), in_size - 1)
    lam = xp.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    i1 = i0 + (i0 < in_size - 1).astype(np.int32)
    if traced or out_size == in_size:
        same, ident = out_size == in_size, xp.minimum(xp.arange(n_out, dtype=np.int32), in_size - 1)
        i0, i1, lam = xp.where(same, ident, i0), xp.where(same, ident, i1), xp.where(same, f32(0), lam)
    return i0, i1, (f32(1) - lam).astype(f32), lam


def _interp_axis(x, taps, axis):
    i0, i1, w0, w1 = taps
    shape = [1] * x.ndim
    shape[axis] = -1
    return (jnp.take(x, i0, axis, mode="clip") * w0.reshape(shape)
            + jnp.take(x, i1, axis, mode="clip") * w1.reshape(shape))


def resize_bilinear(x, taps_h, taps_w, axes=(-2, -1)):
    """Separable bilinear resize along ``axes`` (H, W) with :func:`linear_taps`: torch's order,
    ``(x[h0, w0] ww0 + x[h0, w1] ww1) wh0 + (x[h1, w0] ww0 + x[h1, w1] ww1) wh1``."""
    return _interp_axis(_interp_axis(x, taps_w, axes[1]), taps_h, axes[0])


def interpolate_bilinear(x, size, axes=(1, 2)):
    """F.interpolate(x, size=size, mode='bilinear', align_corners=False), static sizes (NHWC by default). (torch
    sums the four products in another order when out_h + out_w <= 128 -- its channels-last kernel -- which is
    within float32 rounding of this; the mask resizes are larger.)"""
    (h, w), (ha, wa) = size, axes
    return resize_bilinear(x, linear_taps(x.shape[ha], h, h), linear_taps(x.shape[wa], w, w), axes)


# ---------------------------------------------------------------------------------------------------- modules
class MaskFeatModule(nnx.Module):
    """P3 + bilinear P4, P5 (to P3's size) -> ``fusion_conv`` 1x1 -> ``stacked_convs`` 3x3 -> ``projection`` 1x1."""

    def __init__(self, in_channels, feat_channels=256, stacked_convs=4, num_levels=3, num_prototypes=8,
                 act_cfg=(("type", "ReLU"),), norm_cfg=(("type", "BN"),), *, rngs: nnx.Rngs):
        self.num_levels = num_levels
        self.fusion_conv = Conv2d(num_levels * in_channels, in_channels, 1, rngs=rngs)
        self.stacked_convs = Sequential(*[ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3,
                                                     padding=1, act_cfg=act_cfg, norm_cfg=norm_cfg, rngs=rngs)
                                          for i in range(stacked_convs)])
        self.projection = Conv2d(feat_channels, num_prototypes, 1, rngs=rngs)

    def __call__(self, feats):
        size = feats[0].shape[1:3]
        x = jnp.concatenate([feats[0]] + [interpolate_bilinear(f, size) for f in feats[1:self.num_levels]], -1)
        return self.projection(self.stacked_convs(self.fusion_conv(x)))


class RTMDetInsHead(RTMDetHead):
    """visdet's RTMDetInsHead: RTMDetHead + one kernel tower (``kernel_convs``) and ``rtm_kernel``, ``mask_head``;
    ``reg = scale(rtm_reg(f)) * s`` (no exp)."""

    def _init_layers(self, rngs):
        c = self.cfg
        self.weight_nums, self.bias_nums = [], []  # per dynamic conv: (in * out, out), out-major weights
        for i in range(c.num_dyconvs):
            cin = c.num_prototypes + 2 if i == 0 else c.dyconv_channels
            cout = 1 if i == c.num_dyconvs - 1 else c.dyconv_channels
            self.weight_nums.append(cin * cout)
            self.bias_nums.append(cout)
        self.num_gen_params = sum(self.weight_nums) + sum(self.bias_nums)
        self._init_branches(rngs)
        self.mask_head = MaskFeatModule(c.in_channels, c.feat_channels, 4, len(self.strides), c.num_prototypes,
                                        c.act_cfg, c.norm_cfg, rngs=rngs)

    def _init_branches(self, rngs):
        RTMDetHead._init_layers(self, rngs)
        self.kernel_convs = self._tower(rngs)
        self.rtm_kernel = self._predictor(self.num_gen_params, rngs)

    def reg_distances(self, raw, lvl):
        return self.scales[lvl](raw) * self.strides[lvl]

    def __call__(self, feats):
        """-> (cls_scores, bbox_preds, kernel_preds) per level, and mask_feat."""
        mask_feat = self.mask_head(feats)
        cls_scores, bbox_preds = super().__call__(feats)
        kernel_preds = tuple(self.level_module("rtm_kernel", lvl)(self._tower_out("kernel_convs", x, lvl))
                             for lvl, x in enumerate(feats))
        return cls_scores, bbox_preds, kernel_preds, mask_feat

    # ------------------------------------------------------------------------------------------------- masks
    def parse_dynamic_params(self, kernels):
        """kernels (D, G) -> per dynamic conv: weights (D, out, in) (out-major, visdet's reshape), biases (D, out)."""
        d, n = kernels.shape[0], len(self.weight_nums)
        parts = jnp.split(kernels, np.cumsum(self.weight_nums + self.bias_nums)[:-1].tolist(), axis=1)
        return [parts[i].reshape(d, self.bias_nums[i], -1) for i in range(n)], [parts[n + i] for i in range(n)]

    def mask_logits(self, mask_feat, kernels, priors):
        """visdet ``_mask_predict_by_feat_single``: mask_feat (h, w, P), kernels (D, G), priors (D, 4) -> (D, h, w)."""
        h, w, p = mask_feat.shape
        d = kernels.shape[0]
        grid = jnp.asarray(self.prior_generator.single_level_grid_priors((h, w), 0))  # (h*w, 2): (8j, 8i)
        rel = exact_div(priors[:, None, :2] - grid[None], priors[:, None, 2:3] * 8)  # (D, h*w, 2)
        x = jnp.concatenate([rel, jnp.broadcast_to(mask_feat.reshape(1, h * w, p), (d, h * w, p))], -1)
        weights, biases = self.parse_dynamic_params(kernels)
        for i, (wt, b) in enumerate(zip(weights, biases)):
            x = jnp.einsum("dnc,doc->dno", x, wt, precision=PRECISION) + b[:, None, :]
            if i < len(weights) - 1:
                x = relu(x)
        return x[..., 0].reshape(d, h, w)

    def masks_single(self, logits, scale_factor, canvas_hw, rescale, valid):
        """One image: logits (D, h, w) -> masks (D, *canvas) bool (see the module doc), with ``rescale``
        canvas_hw, else (Hp, Wp). Only rows up to the last valid one are computed (NMS keeps come first), one
        at a time (peak memory O(Hp * Wc)), or on the ``mask_resize_lanes`` fast path 16 at a time with the
        detections as the minor axis (the same arithmetic); rows not ``valid`` are empty."""
        stride, thr = self.strides[0], self.cfg.test_cfg.mask_thr_binary
        d, h, w = logits.shape
        hp, wp = h * stride, w * stride
        up = (linear_taps(h, hp, hp, stride), linear_taps(w, wp, wp, stride))  # F.interpolate(scale_factor=8)
        out_hw, inside = (hp, wp), True
        if rescale:  # size [ceil(Hp * (1 / sw)), ceil(Wp * (1 / sh))] (visdet: height from the w factor)
            inv = exact_div(jnp.float32(1), scale_factor[:2].astype(jnp.float32))
            out_h, out_w = (jnp.ceil(jnp.float32(hp) * inv[0]).astype(jnp.int32),
                            jnp.ceil(jnp.float32(wp) * inv[1]).astype(jnp.int32))
            out_hw = tuple(canvas_hw)
            down = (linear_taps(hp, out_h, out_hw[0]), linear_taps(wp, out_w, out_hw[1]))
            inside = (jnp.arange(out_hw[0])[:, None] < out_h) & (jnp.arange(out_hw[1])[None, :] < out_w)

        rows = jnp.max(jnp.where(valid, jnp.arange(1, d + 1), 0))
        if fast_paths.enabled("mask_resize_lanes"):
            inside_hw = jnp.broadcast_to(jnp.asarray(inside), out_hw)
            return masks_in_lanes(logits, valid, rows, up, down if rescale else None, inside_hw, thr, _interp_axis)

        def body(i, masks):
            x = resize_bilinear(logits[i], *up)
            if rescale:
                x = resize_bilinear(x, *down)
            m = (jax.nn.sigmoid(x) > thr) & inside & valid[i]
            return jax.lax.dynamic_update_index_in_dim(masks, m, i, 0)

        return jax.lax.fori_loop(0, rows, body, jnp.zeros((d, *out_hw), bool))

    def predict_masks(self, mask_feat, dets, scale_factors, canvas_hw=None, rescale=True):
        """The masks of :meth:`predict_by_feat`'s detections (made with ``extras={"kernels": kernel_preds}``):
        mask_feat (N, h, w, P) -> (dets + ``masks`` (N, D, *canvas) bool, stages ``det.mask_logits`` (N, D, h, w)).
        ``canvas_hw`` (static) is required with ``rescale``: at least every image's original size."""
        if rescale and canvas_hw is None:
            raise ValueError("RTMDet-Ins masks with rescale=True need canvas_hw (the static mask canvas size)")
        logits = jax.vmap(self.mask_logits)(mask_feat, dets["kernels"], dets["priors"])
        # a loop over the (static) batch, not vmap: the row loop's trip count is per image
        masks = jnp.stack([self.masks_single(logits[i], scale_factors[i], canvas_hw, rescale, dets["valid"][i])
                           for i in range(logits.shape[0])])
        return dict(dets, masks=masks), {"det.mask_logits": logits}

    def predict(self, feats, img_shapes, scale_factors, canvas_hw=None, rescale=True):
        """Head + post-processing: (dets with ``masks``, stages)."""
        cls_scores, bbox_preds, kernel_preds, mask_feat = per_image(self, feats)
        stages = {f"{name}.{lvl}": t for name, ts in (("cls_scores", cls_scores), ("bbox_preds", bbox_preds),
                                                       ("kernel_preds", kernel_preds)) for lvl, t in enumerate(ts)}
        stages["mask_feats"] = mask_feat
        dets, s = self.predict_by_feat(cls_scores, bbox_preds, img_shapes, scale_factors, rescale,
                                       extras={"kernels": kernel_preds})
        stages.update(s)
        dets, s = self.predict_masks(mask_feat, dets, scale_factors, canvas_hw, rescale)
        stages.update(s)
        stages.update({f"det.{k}": dets.pop(k) for k in ("keep", "priors", "kernels")})
        return dets, stages


    # ------------------------------------------------------------------------------------------------ training
    # visdet (and upstream) take the positives' kernels with indices into the image's *valid-prior* subset from the
    # *full* kernel list (rtmdet_ins_head.py:589): wrong whenever an image's pad_shape is smaller than the batch.
    # flaxdet indexes correctly; True reproduces visdet's numbers (the recorded goldens) -- parity only.
    emulate_kernel_index_bug = False

    def _check_trainable(self):
        super()._check_trainable()
        lm = self.cfg.loss_mask
        if lm.TYPE != "DiceLoss" or not lm.use_sigmoid or not lm.activate:
            raise ValueError(f"{self.cfg.TYPE}: loss_mask must be a sigmoid DiceLoss in training")
        if self.strides[0] % self.cfg.mask_loss_stride:
            raise ValueError(f"{self.cfg.TYPE}: mask_loss_stride {self.cfg.mask_loss_stride} must divide the "
                             f"first stride {self.strides[0]}")

    def mask_row_buckets(self):
        """The mask loss's static positives per image (the train step picks one, see ``TrainState``; rows past
        the image's priors are not computed): powers of two from 32, up to 13 positives for each of 2520 GT (an
        image has at most ``topk`` = 13 positives per GT). None on the plain path: every prior's row."""
        if not fast_paths.enabled("mask_row_buckets"):
            return None
        return tuple(32 * 2 ** i for i in range(11))

    def loss_mask_by_feat(self, mask_feat, flat_kernels, priors, valid, targets, gt_masks, rows=None):
        """visdet ``loss_mask_by_feat``: for every positive, its dynamic-conv mask logits (stride 8) from its prior
        and kernel, bilinear x(8 / mask_loss_stride), against its GT mask sampled ``[s/2::s, s/2::s]``; Dice loss
        summed over positives / ``max(number of positives, 1)``. ``rows`` (static): positives per image computed
        (the first ``rows`` in prior order; None: all P). Returns (loss, stages, most positives in an image)."""
        n, p = targets["pos"].shape
        rows = p if rows is None else min(rows, p)
        pos = targets["pos"]
        npos = jnp.sum(pos, 1)
        order = jnp.argsort(~pos, axis=1, stable=True)[:, :rows]  # positives first, ascending prior index
        row_valid = jnp.arange(rows)[None] < npos[:, None]
        kidx = order
        if self.emulate_kernel_index_bug:  # the valid-subset index of each positive, used on the full list
            subset = jnp.cumsum(valid.astype(jnp.int32), 1) - 1
            kidx = jnp.take_along_axis(subset, order, 1)
        kernels = jnp.take_along_axis(flat_kernels, kidx[..., None], 1)  # (N, R, K)
        pri = priors[order]  # (N, R, 4)
        logits = jax.vmap(self.mask_logits)(mask_feat, kernels, pri)  # (N, R, h, w)
        h, w = logits.shape[-2:]
        f = self.strides[0] // self.cfg.mask_loss_stride
        up = interpolate_bilinear_scale(logits, f)
        st = self.cfg.mask_loss_stride
        gt_small = gt_masks[:, :, st // 2::st, st // 2::st]  # (N, G, H/s, W/s)
        gt_idx = jnp.take_along_axis(targets["assign"]["assigned"], order, 1)  # (N, R)
        tgt = jnp.take_along_axis(gt_small, gt_idx[:, :, None, None], 1)
        tgt = tgt[:, :, : up.shape[2], : up.shape[3]]
        lm = self.cfg.loss_mask
        per = dice_loss(jax.nn.sigmoid(up).reshape(n * rows, -1), tgt.reshape(n * rows, -1), lm.eps, lm.naive_dice)
        per = jnp.where(row_valid.reshape(-1), per, 0.0)
        num_pos = jnp.maximum(jnp.sum(npos).astype(jnp.float32), 1.0)
        loss = lm.loss_weight * (jnp.sum(per) / (num_pos + EPS))
        stages = dict(mask_rows=order, mask_row_valid=row_valid, mask_pos_logits=logits, mask_pos_kernels=kernels,
                      mask_pos_priors=pri, mask_loss_pred_logits=up, mask_loss_target=tgt, mask_loss_avg_factor=num_pos)
        return loss, stages, jnp.max(npos)

    def loss(self, feats, batch, mask_rows=None):
        """Head forward, :meth:`loss_by_feat` (GT centres: the masks' centres of mass) and the mask loss."""
        cls_scores, bbox_preds, kernel_preds, mask_feat = self(feats)
        gt_masks = batch["gt_masks"]
        centers = jax.vmap(center_of_mass)(gt_masks)
        losses, extra = self.loss_by_feat(cls_scores, bbox_preds, batch, gt_centers=centers)
        n = cls_scores[0].shape[0]
        flat_k = jnp.concatenate([k.reshape(n, -1, self.num_gen_params) for k in kernel_preds], 1)
        loss_mask, ms, need = self.loss_mask_by_feat(mask_feat, flat_k, extra["priors"], extra["valid"], extra,
                                                     gt_masks, mask_rows)
        losses["loss_mask"] = loss_mask
        return losses, dict(extra, **ms, cls_scores=cls_scores, bbox_preds=bbox_preds, kernel_preds=kernel_preds,
                            mask_feats=mask_feat, mask_rows_needed=need)


def interpolate_bilinear_scale(x, factor):
    """F.interpolate(x, scale_factor=factor, mode='bilinear', align_corners=False) on the last two axes."""
    h, w = x.shape[-2:]
    return resize_bilinear(x, linear_taps(h, h * factor, h * factor, factor),
                           linear_taps(w, w * factor, w * factor, factor))


class RTMDetInsSepBNHead(RTMDetInsHead):
    """The presets' instance head: per-level towers (cls, reg, kernel; the cls/reg convs shared across levels with
    ``share_conv``, kernel convs never), per-level predictors, ``reg = relu(rtm_reg(f)) * s``, no Scale.
    ``tie_reg_to_cls`` (upstream MMDetection): ``reg_convs[l]`` IS ``cls_convs[l]`` (same convs and BNs; the
    state dict then has ``reg_convs.*`` keys equal to ``cls_convs.*``)."""

    sep_bn = True

    def _init_branches(self, rngs):
        c, levels = self.cfg, range(len(self.strides))
        self.cls_convs = nnx.List([self._tower(rngs) for _ in levels])
        self.reg_convs = (nnx.List(list(self.cls_convs)) if c.tie_reg_to_cls
                          else nnx.List([self._tower(rngs) for _ in levels]))
        self.kernel_convs = nnx.List([self._tower(rngs) for _ in levels])
        self.rtm_cls = nnx.List([self._predictor(self.cls_out_channels, rngs) for _ in levels])
        self.rtm_reg = nnx.List([self._predictor(4, rngs) for _ in levels])
        self.rtm_kernel = nnx.List([self._predictor(self.num_gen_params, rngs) for _ in levels])
        self.rtm_obj = nnx.List([self._predictor(1, rngs) for _ in levels] if self.with_objectness else [])
        if c.share_conv:
            self._share_convs(self.cls_convs, self.reg_convs)

    def reg_distances(self, raw, lvl):
        return relu(raw) * self.strides[lvl]
