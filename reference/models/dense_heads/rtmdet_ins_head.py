"""RTMDetInsHead, RTMDetInsSepBNHead and MaskFeatModule (visdet ``models/dense_heads/rtmdet_ins_head.py``),
inference and the training loss.

On top of the detection towers: per level a kernel tower (``kernel_convs[l]``, never shared) and a 1x1
``rtm_kernel[l]`` giving the ``num_gen_params`` (169) dynamic-conv parameters of each prior, split in order
as [w0 | w1 | w2 | b0 | b1 | b2]; regression is ``relu(rtm_reg(f)) * stride``. ``mask_head`` (MaskFeatModule)
fuses P3 with P4/P5 resized bilinearly to P3's size into ``num_prototypes`` stride-8 mask features.
A detection's mask logits: ``cat[(prior - grid) / (8 * stride), mask_feat]`` through the dynamic 1x1 convs
(ReLU between), at stride 8; then bilinear x8 to the padded input, with rescale bilinear to
``(ceil(Hp / sw), ceil(Wp / sh))`` (visdet's code: the w factor sizes the height), cropped to ``ori_shape``,
``sigmoid > mask_thr_binary``.

Training: RTMDetHead's cls/bbox losses (the assigner takes GT centres from the masks' centres of mass), plus
``loss_mask``: per positive, its kernel and prior through the dynamic convs at stride 8, bilinear x(8 //
``mask_loss_stride``), DiceLoss against the padded GT mask subsampled ``[s//2::s, s//2::s]``, averaged over
``max(reduce_mean(#positives), 1)``. Kernel-index bug (visdet and upstream, ``rtmdet_ins_head.py:589``):
``kernels[pos_inds]`` indexes the image's *full* prior list with indices into its *valid-prior* subset, so when
``pad_shape < batch_input_shape`` positives take another location's kernel (their priors stay right). Here the
kernels are taken through the valid -> full map by default; ``emulate_kernel_index_bug=True`` (attribute, or
argument of ``loss_by_feat``) reproduces visdet.

``tie_reg_to_cls`` (SepBN head): upstream MMDetection's architecture, where ``reg_convs[l]`` *is*
``cls_convs[l]`` (visdet, the default, builds an independent reg tower).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flaxdet.config import RTMDetInsSepBNHeadCfg
from flaxdet_reference.models.dense_heads.base_dense_head import scale_factor_wh
from flaxdet_reference.models.dense_heads.rtmdet_head import (
    RTMDetHead,
    RTMDetSepBNHead,
    inverse_sigmoid,
    reduce_mean,
    sigmoid_geometric_mean,
)
from flaxdet_reference.models.layers import ConvModule
from flaxdet_reference.models.losses import build_loss


class MaskFeatModule(nn.Module):
    def __init__(self, in_channels, feat_channels=256, stacked_convs=4, num_levels=3, num_prototypes=8,
                 act_cfg=(("type", "ReLU"),), norm_cfg=(("type", "BN"),)):
        super().__init__()
        self.num_levels = num_levels
        self.fusion_conv = nn.Conv2d(num_levels * in_channels, in_channels, 1)
        self.stacked_convs = nn.Sequential(*[
            ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1, act_cfg=act_cfg,
                       norm_cfg=norm_cfg) for i in range(stacked_convs)])
        self.projection = nn.Conv2d(feat_channels, num_prototypes, kernel_size=1)

    def forward(self, features):
        size = features[0].shape[-2:]
        fused = [features[0]] + [F.interpolate(features[i], size=size, mode="bilinear")
                                 for i in range(1, self.num_levels)]
        return self.projection(self.stacked_convs(self.fusion_conv(torch.cat(fused, dim=1))))


class RTMDetInsHead(RTMDetHead):
    priors_with_stride = True
    emulate_kernel_index_bug = False  # True: visdet's kernels[pos_inds] (see the module docstring)

    def __init__(self, cfg: RTMDetInsSepBNHeadCfg):
        self.num_prototypes, self.dyconv_channels = cfg.num_prototypes, cfg.dyconv_channels
        self.num_dyconvs, self.mask_loss_stride = cfg.num_dyconvs, cfg.mask_loss_stride
        super().__init__(cfg)
        self.loss_mask = build_loss(cfg.loss_mask)

    def _init_dyconv_sizes(self):
        p, d, n = self.num_prototypes, self.dyconv_channels, self.num_dyconvs
        self.weight_nums = [(p + 2) * d if i == 0 else d if i == n - 1 else d * d for i in range(n)]
        self.bias_nums = [1 if i == n - 1 else d for i in range(n)]
        self.num_gen_params = sum(self.weight_nums) + sum(self.bias_nums)

    def _mask_head(self):
        return MaskFeatModule(self.in_channels, self.feat_channels, stacked_convs=4,
                              num_levels=len(self.prior_generator.strides), num_prototypes=self.num_prototypes,
                              act_cfg=self.act_cfg, norm_cfg=self.norm_cfg)

    def _init_layers(self):
        super()._init_layers()
        self._init_dyconv_sizes()
        self.kernel_convs = self._tower()
        self.rtm_kernel = self._pred(self.num_gen_params)
        self.mask_head = self._mask_head()

    def forward(self, feats):
        mask_feat = self.mask_head(feats)
        cls_scores, bbox_preds, kernel_preds = [], [], []
        for x, scale, stride in zip(feats, self.scales, self.prior_generator.strides):
            cls_score = self.rtm_cls(self._run(self.cls_convs, x))
            kernel_preds.append(self.rtm_kernel(self._run(self.kernel_convs, x)))
            reg_feat = self._run(self.reg_convs, x)
            if self.with_objectness:
                cls_score = inverse_sigmoid(sigmoid_geometric_mean(cls_score, self.rtm_obj(reg_feat)))
            cls_scores.append(cls_score)
            bbox_preds.append(scale(self.rtm_reg(reg_feat)) * stride[0])
        return tuple(cls_scores), tuple(bbox_preds), tuple(kernel_preds), mask_feat

    @staticmethod
    def record_outputs(outs, stages):
        for name, per_level in zip(("cls_scores", "bbox_preds", "kernel_preds"), outs):
            stages.update({f"{name}.{lvl}": t for lvl, t in enumerate(per_level)})
        stages["mask_feats"] = outs[3]

    def predict_by_feat(self, cls_scores, bbox_preds, kernel_preds, mask_feat, img_metas, cfg=None, rescale=False,
                        with_nms=True, stages=None):
        return super().predict_by_feat(cls_scores, bbox_preds, img_metas, cfg, rescale, with_nms, stages,
                                       extra={"kernels": kernel_preds}, image_feats={"mask_feat": mask_feat})

    def _bbox_post_process(self, results, cfg, rescale=False, with_nms=True, img_meta=None, stages=None,
                           image_feats=None):
        """visdet's ``_bbox_mask_post_process``: the box steps, then the masks of the kept detections."""
        if not with_nms:
            raise ValueError("with_nms must be True for RTMDet-Ins")
        results = super()._bbox_post_process(results, cfg, rescale, with_nms, img_meta, stages)
        if results["bboxes"].numel() == 0:
            h, w = img_meta["ori_shape"][:2] if rescale else img_meta["img_shape"][:2]
            results["masks"] = torch.zeros((results["bboxes"].shape[0], h, w), dtype=torch.bool,
                                           device=results["bboxes"].device)
            return results
        logits = self._mask_predict_by_feat_single(image_feats["mask_feat"], results["kernels"], results["priors"])
        if stages is not None:
            stages["det.mask_logits_first16"] = logits[:16]
        logits = F.interpolate(logits.unsqueeze(0), scale_factor=self.prior_generator.strides[0][0], mode="bilinear")
        if rescale:
            factor = [1 / s for s in scale_factor_wh(img_meta)]
            ori_h, ori_w = img_meta["ori_shape"][:2]
            size = [math.ceil(logits.shape[-2] * factor[0]), math.ceil(logits.shape[-1] * factor[1])]
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[..., :ori_h, :ori_w]
        results["masks"] = logits.sigmoid().squeeze(0) > cfg.mask_thr_binary
        return results

    def parse_dynamic_params(self, flatten_kernels):
        """(n, num_gen_params) -> per layer weights ((n * out), in, 1, 1) and biases (n * out,)."""
        n_inst, n_layers = flatten_kernels.size(0), len(self.weight_nums)
        splits = list(torch.split_with_sizes(flatten_kernels, self.weight_nums + self.bias_nums, dim=1))
        weights, biases = splits[:n_layers], splits[n_layers:]
        for i in range(n_layers):
            out = self.dyconv_channels if i < n_layers - 1 else 1
            weights[i] = weights[i].reshape(n_inst * out, -1, 1, 1)
            biases[i] = biases[i].reshape(n_inst * out)
        return weights, biases

    def _mask_predict_by_feat_single(self, mask_feat, kernels, priors):
        """mask_feat (C, h, w), kernels (n, num_gen_params), priors (n, 4) -> mask logits (n, h, w)."""
        num_inst = priors.shape[0]
        h, w = mask_feat.size()[-2:]
        if num_inst < 1:
            return torch.empty((num_inst, h, w), dtype=mask_feat.dtype, device=mask_feat.device)
        coord = self.prior_generator.single_level_grid_priors((h, w), level_idx=0, device=mask_feat.device)
        points, strides = priors[:, :2].reshape(-1, 1, 2), priors[:, 2:].reshape(-1, 1, 2)
        relative = (points - coord.reshape(1, -1, 2)).permute(0, 2, 1) / (strides[..., 0].reshape(-1, 1, 1) * 8)
        x = torch.cat([relative.reshape(num_inst, 2, h, w), mask_feat.repeat(num_inst, 1, 1, 1)], dim=1)
        x = x.reshape(1, -1, h, w)
        weights, biases = self.parse_dynamic_params(kernels)
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            x = F.conv2d(x, weight, bias=bias, stride=1, padding=0, groups=num_inst)
            if i < len(weights) - 1:
                x = F.relu(x)
        return x.reshape(num_inst, h, w)

    # -- training -----------------------------------------------------------------------------------
    def loss_by_feat(self, cls_scores, bbox_preds, kernel_preds, mask_feat, batch_gt_instances, batch_img_metas,
                     stages=None, emulate_kernel_index_bug=None):
        """As RTMDetHead's, with ``masks`` (G, H, W) bool, padded to the batch input shape, required per image.
        Returns dict(loss_cls=[per level], loss_bbox=[per level], loss_mask=scalar)."""
        num_imgs = len(batch_img_metas)
        for gt in batch_gt_instances:
            if "masks" not in gt:
                raise ValueError("RTMDet-Ins training needs GT masks")
        gts = [dict(gt, masks=torch.as_tensor(gt["masks"], device=mask_feat.device).to(torch.bool))
               for gt in batch_gt_instances]
        flatten_kernels = torch.cat([k.permute(0, 2, 3, 1).reshape(num_imgs, -1, self.num_gen_params)
                                     for k in kernel_preds], 1)
        t = self._targets_and_losses(cls_scores, bbox_preds, gts, batch_img_metas, stages)
        loss_mask = self.loss_mask_by_feat(mask_feat, flatten_kernels, t["sampling_results"], gts, t["inside_flags"],
                                           emulate_kernel_index_bug, stages)
        return dict(loss_cls=t["losses_cls"], loss_bbox=t["losses_bbox"], loss_mask=loss_mask)

    def loss_mask_by_feat(self, mask_feats, flatten_kernels, sampling_results_list, batch_gt_instances,
                          inside_flags_list=None, emulate_kernel_index_bug=None, stages=None):
        """mask_feats (N, P, h, w), flatten_kernels (N, A, num_gen_params) over all priors; sampling results index
        each image's valid priors (``inside_flags_list``: their flags over all priors; needed unless emulating)."""
        emulate = self.emulate_kernel_index_bug if emulate_kernel_index_bug is None else emulate_kernel_index_bug
        logits, kernels_used, priors_used, gt_masks = [], [], [], []
        for i, (mask_feat, kernels, sr, gt) in enumerate(zip(mask_feats, flatten_kernels, sampling_results_list,
                                                               batch_gt_instances)):
            if emulate:
                pos_kernels = kernels[sr.pos_inds]  # visdet: a valid-subset index into the full list
            else:
                if inside_flags_list is None:
                    raise ValueError("correct kernel indexing needs inside_flags_list")
                valid_to_full = torch.nonzero(inside_flags_list[i], as_tuple=False).squeeze(1)
                pos_kernels = kernels[valid_to_full[sr.pos_inds]]
            logits.append(self._mask_predict_by_feat_single(mask_feat, pos_kernels, sr.pos_priors))
            kernels_used.append(pos_kernels)
            priors_used.append(sr.pos_priors)
            masks = gt["masks"]
            gt_masks.append(torch.empty_like(masks) if masks.numel() == 0 else masks[sr.pos_assigned_gt_inds, :])
        pos_gt_masks = torch.cat(gt_masks, 0)
        pos_mask_logits = torch.cat(logits, 0)
        num_pos = reduce_mean(mask_feats.new_tensor([pos_mask_logits.shape[0]])).clamp_(min=1).item()
        if stages is not None:
            stages.update(mask_pos_logits=pos_mask_logits, mask_pos_kernels=torch.cat(kernels_used, 0),
                          mask_pos_priors=torch.cat(priors_used, 0), mask_loss_avg_factor=num_pos)
        if pos_mask_logits.shape[0] == 0:
            return mask_feats.sum() * 0
        scale = self.prior_generator.strides[0][0] // self.mask_loss_stride
        pos_mask_logits = F.interpolate(pos_mask_logits.unsqueeze(0), scale_factor=scale, mode="bilinear",
                                        align_corners=False).squeeze(0)
        s = self.mask_loss_stride
        pos_gt_masks = pos_gt_masks[:, s // 2::s, s // 2::s]
        if pos_gt_masks.shape[-2:] != pos_mask_logits.shape[-2:]:
            raise ValueError(f"GT masks subsampled to {tuple(pos_gt_masks.shape[-2:])} vs mask logits "
                             f"{tuple(pos_mask_logits.shape[-2:])}: pad the GT masks to the batch input shape")
        if stages is not None:
            stages.update(mask_loss_pred_logits=pos_mask_logits, mask_loss_target=pos_gt_masks)
        return self.loss_mask(pos_mask_logits, pos_gt_masks, weight=None, avg_factor=num_pos)


class RTMDetInsSepBNHead(RTMDetInsHead, RTMDetSepBNHead):
    def __init__(self, cfg: RTMDetInsSepBNHeadCfg):
        self.tie_reg_to_cls = cfg.tie_reg_to_cls
        super().__init__(cfg)

    def _init_layers(self):
        self._init_dyconv_sizes()
        levels = range(len(self.prior_generator.strides))
        self.cls_convs = nn.ModuleList([self._tower() for _ in levels])
        self.reg_convs = nn.ModuleList([c if self.tie_reg_to_cls else self._tower() for c in self.cls_convs])
        self.kernel_convs = nn.ModuleList([self._tower() for _ in levels])
        self.rtm_cls = nn.ModuleList([self._pred(self.num_base_priors * self.cls_out_channels) for _ in levels])
        self.rtm_reg = nn.ModuleList([self._pred(self.num_base_priors * 4) for _ in levels])
        self.rtm_kernel = nn.ModuleList([self._pred(self.num_gen_params) for _ in levels])
        self.rtm_obj = nn.ModuleList([self._pred(1) for _ in levels] if self.with_objectness else [])
        self._share_convs()
        self.mask_head = self._mask_head()

    def forward(self, feats):
        mask_feat = self.mask_head(feats)
        cls_scores, bbox_preds, kernel_preds = [], [], []
        for idx, (x, stride) in enumerate(zip(feats, self.prior_generator.strides)):
            cls_score = self.rtm_cls[idx](self._run(self.cls_convs[idx], x))
            kernel_preds.append(self.rtm_kernel[idx](self._run(self.kernel_convs[idx], x)))
            reg_feat = self._run(self.reg_convs[idx], x)
            if self.with_objectness:
                cls_score = inverse_sigmoid(sigmoid_geometric_mean(cls_score, self.rtm_obj[idx](reg_feat)))
            cls_scores.append(cls_score)
            bbox_preds.append(F.relu(self.rtm_reg[idx](reg_feat)) * stride[0])
        return tuple(cls_scores), tuple(bbox_preds), tuple(kernel_preds), mask_feat
