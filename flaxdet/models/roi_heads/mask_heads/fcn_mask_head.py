"""FCNMaskHead (visdet ``mask_heads/fcn_mask_head.py``) and its test-time paste."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxdet.config import FCNMaskHeadCfg
from flaxdet.models.layers import ConvModule
from flaxdet.models.losses import mask_cross_entropy
from flaxdet.nn import Conv2d, ConvTranspose2d, exact_div, relu
from flaxdet.ops.mask_paste import paste_masks
from flaxdet.structures.mask.mask_target import mask_target


class FCNMaskHead(nnx.Module):
    def __init__(self, cfg: FCNMaskHeadCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        up = dict(cfg.upsample_cfg)
        self.upsample_method = up.get("type")
        if self.upsample_method not in (None, "deconv"):
            raise ValueError(f"FCNMaskHead: upsample type {self.upsample_method!r} is not supported "
                             "(supported: deconv, None)")
        pad = (cfg.conv_kernel_size - 1) // 2
        self.convs = nnx.List([
            ConvModule(cfg.in_channels if i == 0 else cfg.conv_out_channels, cfg.conv_out_channels,
                       cfg.conv_kernel_size, padding=pad, conv_cfg=cfg.conv_cfg, norm_cfg=cfg.norm_cfg, rngs=rngs)
            for i in range(cfg.num_convs)])
        up_in = cfg.conv_out_channels if cfg.num_convs > 0 else cfg.in_channels
        sf = up.get("scale_factor", 2)
        self.upsample = (ConvTranspose2d(up_in, cfg.conv_out_channels, sf, sf, rngs=rngs)
                         if self.upsample_method == "deconv" else None)
        logits_in = cfg.conv_out_channels if self.upsample_method == "deconv" else up_in
        self.conv_logits = Conv2d(logits_in, 1 if cfg.class_agnostic else cfg.num_classes, 1, rngs=rngs)

    def __call__(self, x):
        for conv in self.convs:
            x = conv(x)
        if self.upsample is not None:
            x = relu(self.upsample(x))
        return self.conv_logits(x)

    def loss_and_target(self, mask_preds, rois, gt_idx, labels, valid, gt_masks, rcnn_train_cfg):
        """visdet ``FCNMaskHead.loss_and_target`` on R rows per image: ``mask_preds`` (N*R, m, m, C) logits,
        ``rois`` (N, R, 4), ``gt_idx`` / ``labels`` (N, R) of each row's GT, ``valid`` (N*R,) the positive
        rows, ``gt_masks`` (N, G, Hp, Wp). BCE of each row's label channel against its mask target, mean
        over the valid rows' pixels. Returns (weighted loss, targets (N*R, m, m), selected logits)."""
        size = rcnn_train_cfg.mask_size
        targets = mask_target(rois, gt_idx, gt_masks, valid, size).astype(mask_preds.dtype)
        channel = jnp.zeros_like(labels) if self.cfg.class_agnostic else labels
        loss, logits = mask_cross_entropy(mask_preds, targets, channel.reshape(-1), valid)
        return self.cfg.loss_mask.loss_weight * loss, targets, logits

    def predict_single(self, mask_logits, bboxes, labels, scale_factor, canvas_hw, thr, rescale=True,
                       activate_map=False):
        """mask_logits (D, 28, 28, C); bboxes (D, 4) resized frame. Returns (masks (D, H, W) bool,
        bboxes in the canvas frame). ``canvas_hw`` is static (the original size, or its bucket).
        ``activate_map``: ``mask_logits`` are already probabilities (Cascade's merged masks, visdet's flag)."""
        if self.cfg.class_agnostic:
            logits = mask_logits[..., 0]
        else:
            logits = jnp.take_along_axis(mask_logits, labels[:, None, None, None].astype(jnp.int32), axis=-1)[..., 0]
        probs = logits if activate_map else jax.nn.sigmoid(logits)
        if rescale:
            sf = scale_factor[:2]
            bboxes = exact_div(bboxes, jnp.concatenate([sf, sf]))
        masks = paste_masks(probs, bboxes, canvas_hw[0], canvas_hw[1], thr)
        return masks, bboxes
