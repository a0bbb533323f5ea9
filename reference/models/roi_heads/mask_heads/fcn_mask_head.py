"""FCNMaskHead (visdet ``mask_heads/fcn_mask_head.py``): Detectron2-style mask pasting, and the training
loss (BCE on each positive RoI's GT-class channel against RoIAlign-cropped GT masks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flaxdet.config import FCNMaskHeadCfg, RCNNTestCfg
from flaxdet_reference.models.layers import ConvModule
from flaxdet_reference.models.losses import build_loss
from flaxdet_reference.structures.mask.mask_target import mask_target


class FCNMaskHead(nn.Module):
    def __init__(self, cfg: FCNMaskHeadCfg):
        super().__init__()
        self.cfg = cfg
        up = dict(cfg.upsample_cfg)
        self.upsample_method = up.get("type")
        if self.upsample_method not in (None, "deconv", "nearest", "bilinear"):
            raise ValueError(f"FCNMaskHead: upsample type {self.upsample_method!r} is not supported")
        self.num_classes = cfg.num_classes
        self.class_agnostic = cfg.class_agnostic
        pad = (cfg.conv_kernel_size - 1) // 2
        self.convs = nn.ModuleList([
            ConvModule(cfg.in_channels if i == 0 else cfg.conv_out_channels, cfg.conv_out_channels,
                       cfg.conv_kernel_size, padding=pad, conv_cfg=cfg.conv_cfg, norm_cfg=cfg.norm_cfg)
            for i in range(cfg.num_convs)])
        up_in = cfg.conv_out_channels if cfg.num_convs > 0 else cfg.in_channels
        sf = up.get("scale_factor", 2)
        if self.upsample_method is None:
            self.upsample = None
        elif self.upsample_method == "deconv":
            self.upsample = nn.ConvTranspose2d(up_in, cfg.conv_out_channels, sf, stride=sf)
        else:
            self.upsample = nn.Upsample(scale_factor=sf, mode=self.upsample_method,
                                        align_corners=False if self.upsample_method == "bilinear" else None)
        logits_in = cfg.conv_out_channels if self.upsample_method == "deconv" else up_in
        self.conv_logits = nn.Conv2d(logits_in, 1 if cfg.class_agnostic else cfg.num_classes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.loss_mask = build_loss(cfg.loss_mask)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        if self.upsample is not None:
            x = self.upsample(x)
            if self.upsample_method == "deconv":
                x = self.relu(x)
        return self.conv_logits(x)

    def get_targets(self, sampling_results, gt_masks, rcnn_train_cfg):
        return mask_target([r.pos_priors for r in sampling_results],
                           [r.pos_assigned_gt_inds for r in sampling_results], gt_masks, rcnn_train_cfg)

    def loss_and_target(self, mask_preds, sampling_results, gt_masks, rcnn_train_cfg):
        """gt_masks: per image (k, H, W) tensors (padded to the batch shape when the preprocessor pads masks)."""
        mask_targets = self.get_targets(sampling_results, gt_masks, rcnn_train_cfg)
        pos_labels = torch.cat([r.pos_gt_labels for r in sampling_results])
        if mask_preds.size(0) == 0:
            loss_mask = mask_preds.sum()
        else:
            loss_mask = self.loss_mask(mask_preds, mask_targets,
                                       torch.zeros_like(pos_labels) if self.class_agnostic else pos_labels)
        return dict(loss_mask=dict(loss_mask=loss_mask), mask_targets=mask_targets)

    def predict_single(self, mask_preds, bboxes, labels, img_meta, cfg: RCNNTestCfg, rescale: bool,
                       activate_map: bool = False):
        """Binary masks (N, H, W) pasted into the original image; returns (masks, bboxes)."""
        sf = list(img_meta["scale_factor"])
        scale_factor = bboxes.new_tensor(sf[:2]).repeat((1, 2))  # [w, h, w, h]
        img_h, img_w = img_meta["ori_shape"][:2]
        probs = mask_preds if activate_map else mask_preds.sigmoid()
        if rescale:
            bboxes = bboxes / scale_factor
        else:
            w_scale, h_scale = scale_factor[0, 0].item(), scale_factor[0, 1].item()
            img_h, img_w = int(round(img_h * h_scale)), int(round(img_w * w_scale))
        n = len(probs)
        thr = cfg.mask_thr_binary
        im_mask = torch.zeros(n, img_h, img_w, dtype=torch.bool if thr >= 0 else torch.uint8)
        if not self.class_agnostic:
            probs = probs[torch.arange(n), labels][:, None]
        for i in range(n):  # visdet's CPU path: one box per chunk, skip_empty=True
            chunk, (ys, xs) = paste_masks(probs[i:i + 1], bboxes[i:i + 1], img_h, img_w)
            im_mask[i:i + 1, ys, xs] = chunk >= thr if thr >= 0 else (chunk * 255).to(torch.uint8)
        return im_mask, bboxes


def paste_masks(masks, boxes, img_h, img_w):
    """``_do_paste_mask`` with skip_empty=True: grid_sample of probabilities in a box's region."""
    x0_int, y0_int = torch.clamp(boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
    x1_int = torch.clamp(boxes[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
    y1_int = torch.clamp(boxes[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    n = masks.shape[0]
    img_y = torch.arange(y0_int, y1_int, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    img_x[torch.isinf(img_x)] = 0
    img_y[torch.isinf(img_y)] = 0
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    out = F.grid_sample(masks.to(torch.float32), grid, align_corners=False)
    return out[:, 0], (slice(int(y0_int), int(y1_int)), slice(int(x0_int), int(x1_int)))
