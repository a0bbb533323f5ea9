"""RTMDetHead and RTMDetSepBNHead (visdet ``models/dense_heads/rtmdet_head.py``): inference and the training
loss (``loss`` / ``loss_by_feat``).

RTMDetSepBNHead, per level l (strides 8/16/32): ``cls_convs[l]`` / ``reg_convs[l]`` (``stacked_convs`` 3x3
ConvModules), 1x1 ``rtm_cls[l]`` (raw logits) and ``rtm_reg[l]``; box distances = ``rtm_reg(f) * stride``
(``exp(rtm_reg(f)) * stride`` with ``exp_on_reg``). With ``share_conv`` the ``.conv`` of levels 1, 2 *is* the
level-0 module (the state dict lists it under all three names); each level keeps its own BN.
RTMDetHead (the plain variant visdet derives from): one tower for all levels, ``Scale`` per level, always exp.
With ``with_objectness`` the logit becomes ``inverse_sigmoid(sqrt(sigmoid(cls) * sigmoid(obj)))``.

Training (``loss_by_feat``): priors (x, y, stride, stride) of all levels; every prediction decoded without
clamping (``distance2bbox``). Per image, over its valid priors (``valid_flags`` from its own ``pad_shape``;
``allowed_border`` -1), on *detached* logits and boxes: DynamicSoftLabelAssigner, PseudoSampler, targets
(positives: GT label, weight 1, GT box, assign_metric = matched IoU; negatives: label ``num_classes``, weight 1;
invalid priors: label ``num_classes``, weight 0). Per level: QFL over all priors and GIoU (weighted by
assign_metric) over the positives, both with ``avg_factor=1.0``; then both lists divided by
``A = max(reduce_mean(sum of assign_metrics), 1)`` (``reduce_mean`` is the identity on one process).
``stages`` (a dict) receives every intermediate under the names of the goldens' ``train_step.npz``
(``priors``, ``valid_flags_img{i}``, ``assign_img{i}_*``, ``sample_img{i}_*``, ``decoded_bboxes.{l}``,
``target_*.{l}``, ``loss_raw_*.{l}``, ``avg_*_part.{l}``, ``cls_avg_factor``, ``bbox_avg_factor``) plus
``assign_results`` / ``sampling_results`` / ``inside_flags`` (per image objects).
"""
from __future__ import annotations

import torch
from torch import nn

from flaxdet.config import RTMDetSepBNHeadCfg
from flaxdet_reference.models.dense_heads.anchor_head import anchor_inside_flags, images_to_levels, unmap
from flaxdet_reference.models.dense_heads.base_dense_head import BaseDenseHead
from flaxdet_reference.models.layers import ConvModule, DepthwiseSeparableConvModule
from flaxdet_reference.models.losses import build_loss
from flaxdet_reference.models.task_modules.assigners.dynamic_soft_label_assigner import DynamicSoftLabelAssigner
from flaxdet_reference.models.task_modules.coders.distance_point_bbox_coder import (
    DistancePointBBoxCoder,
    distance2bbox,
)
from flaxdet_reference.models.task_modules.prior_generators.point_generator import MlvlPointGenerator
from flaxdet_reference.models.task_modules.samplers.pseudo_sampler import PseudoSampler


def reduce_mean(tensor):
    """visdet ``models/utils/dist_utils.reduce_mean``: the mean over processes; the identity on one process."""
    return tensor


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sigmoid_geometric_mean(x, y):
    return (x.sigmoid() * y.sigmoid()).sqrt()


class Scale(nn.Module):
    """visdet ``cv/cnn/bricks/scale.py``: a learnable scalar (key ``scale``)."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x):
        return x * self.scale


class RTMDetHead(BaseDenseHead):
    def __init__(self, cfg: RTMDetSepBNHeadCfg):
        super().__init__()
        if cfg.num_classes is None:
            raise ValueError("bbox_head.num_classes is not set (visdet's RTMDet presets leave it out)")
        if cfg.anchor_generator.TYPE != "MlvlPointGenerator" or cfg.bbox_coder.TYPE != "DistancePointBBoxCoder":
            raise ValueError("RTMDet heads need MlvlPointGenerator and DistancePointBBoxCoder")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.in_channels, self.feat_channels = cfg.in_channels, cfg.feat_channels
        self.stacked_convs, self.pred_kernel_size = cfg.stacked_convs, cfg.pred_kernel_size
        self.with_objectness = cfg.with_objectness
        self.conv_cfg, self.norm_cfg, self.act_cfg = cfg.conv_cfg, cfg.norm_cfg, cfg.act_cfg
        self.train_cfg, self.test_cfg = cfg.train_cfg, cfg.test_cfg
        self.prior_generator = MlvlPointGenerator(cfg.anchor_generator)
        self.bbox_coder = DistancePointBBoxCoder(cfg.bbox_coder)
        self.use_sigmoid_cls = getattr(cfg.loss_cls, "use_sigmoid", False)
        self.cls_out_channels = cfg.num_classes if self.use_sigmoid_cls else cfg.num_classes + 1
        self.num_base_priors = self.prior_generator.num_base_priors[0]
        self._init_layers()
        self.loss_cls = build_loss(cfg.loss_cls)
        self.loss_bbox = build_loss(cfg.loss_bbox)
        if self.train_cfg is not None:
            if self.train_cfg.assigner.TYPE != "DynamicSoftLabelAssigner":
                raise ValueError("RTMDet heads train with DynamicSoftLabelAssigner, not "
                                 f"{self.train_cfg.assigner.TYPE}")
            self.assigner = DynamicSoftLabelAssigner(self.train_cfg.assigner)
            self.sampler = PseudoSampler()

    def _conv(self, cin, conv=ConvModule):
        return conv(cin, self.feat_channels, 3, stride=1, padding=1, conv_cfg=self.conv_cfg,
                    norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)

    def _pred(self, cout):
        return nn.Conv2d(self.feat_channels, cout, self.pred_kernel_size, padding=self.pred_kernel_size // 2)

    def _tower(self, conv=ConvModule):
        return nn.ModuleList([self._conv(self.in_channels if i == 0 else self.feat_channels, conv)
                              for i in range(self.stacked_convs)])

    def _init_layers(self):
        self.cls_convs, self.reg_convs = self._tower(), self._tower()
        self.rtm_cls = self._pred(self.num_base_priors * self.cls_out_channels)
        self.rtm_reg = self._pred(self.num_base_priors * 4)
        if self.with_objectness:
            self.rtm_obj = self._pred(1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.prior_generator.strides])

    @staticmethod
    def _run(layers, x):
        for layer in layers:
            x = layer(x)
        return x

    def forward(self, feats):
        cls_scores, bbox_preds = [], []
        for x, scale, stride in zip(feats, self.scales, self.prior_generator.strides):
            cls_score = self.rtm_cls(self._run(self.cls_convs, x))
            reg_feat = self._run(self.reg_convs, x)
            if self.with_objectness:
                cls_score = inverse_sigmoid(sigmoid_geometric_mean(cls_score, self.rtm_obj(reg_feat)))
            cls_scores.append(cls_score)
            bbox_preds.append(scale(self.rtm_reg(reg_feat).exp()).float() * stride[0])
        return tuple(cls_scores), tuple(bbox_preds)

    # -- training -----------------------------------------------------------------------------------
    def loss(self, x, batch_gt_instances, batch_img_metas, stages=None, **kwargs):
        """visdet ``BaseDenseHead.loss``: the forward, then :meth:`loss_by_feat` (see there for the inputs)."""
        outs = self(x)
        if stages is not None:
            self.record_outputs(outs, stages)
        return self.loss_by_feat(*outs, batch_gt_instances, batch_img_metas, stages=stages, **kwargs)

    def get_anchors(self, featmap_sizes, batch_img_metas, device="cpu"):
        """-> ([per image [per level (n_l, 4) priors (x, y, stride, stride)]], [per image [per level flags]])."""
        priors = self.prior_generator.grid_priors(featmap_sizes, device=device, with_stride=True)
        return ([priors for _ in batch_img_metas],
                [self.prior_generator.valid_flags(featmap_sizes, m["pad_shape"], device) for m in batch_img_metas])

    def _flatten_and_decode(self, cls_scores, bbox_preds, anchor_list):
        num_imgs = cls_scores[0].size(0)
        flatten_cls_scores = torch.cat([c.permute(0, 2, 3, 1).reshape(num_imgs, -1, self.cls_out_channels)
                                        for c in cls_scores], 1)
        decoded_bboxes = [distance2bbox(anchor.reshape(-1, 4), bbox_pred.permute(0, 2, 3, 1).reshape(num_imgs, -1, 4))
                          for anchor, bbox_pred in zip(anchor_list[0], bbox_preds)]
        return flatten_cls_scores, decoded_bboxes

    def loss_by_feat(self, cls_scores, bbox_preds, batch_gt_instances, batch_img_metas, stages=None):
        """batch_gt_instances: per image dict(bboxes (G, 4) float xyxy, labels (G,) long[, masks (G, H, W) bool:
        given, the assigner takes the GT centres from them, as visdet does whenever ``gt_instances`` has masks]);
        batch_img_metas: per image dict with ``pad_shape`` (and ``img_shape``). Returns dict(loss_cls=[per
        level], loss_bbox=[per level])."""
        targets = self._targets_and_losses(cls_scores, bbox_preds, batch_gt_instances, batch_img_metas, stages)
        return dict(loss_cls=targets["losses_cls"], loss_bbox=targets["losses_bbox"])

    def _targets_and_losses(self, cls_scores, bbox_preds, batch_gt_instances, batch_img_metas, stages=None):
        if self.train_cfg is None:
            raise ValueError("this head has no train_cfg: it cannot compute training losses")
        featmap_sizes = [featmap.size()[-2:] for featmap in cls_scores]
        if len(featmap_sizes) != self.prior_generator.num_levels:
            raise ValueError("featmap_sizes must match prior_generator.num_levels")
        anchor_list, valid_flag_list = self.get_anchors(featmap_sizes, batch_img_metas, cls_scores[0].device)
        flatten_cls_scores, decoded_bboxes = self._flatten_and_decode(cls_scores, bbox_preds, anchor_list)
        t = self.get_targets(flatten_cls_scores, torch.cat(decoded_bboxes, 1), anchor_list, valid_flag_list,
                             batch_gt_instances, batch_img_metas, stages)
        parts = [self.loss_by_feat_single(*args) for args in zip(
            cls_scores, decoded_bboxes, t["labels"], t["label_weights"], t["bbox_targets"], t["assign_metrics"],
            self.prior_generator.strides)]
        losses_cls, losses_bbox, cls_avg_factors, bbox_avg_factors = (list(p) for p in zip(*parts))
        cls_avg_factor = reduce_mean(sum(cls_avg_factors)).clamp_(min=1).item()
        bbox_avg_factor = reduce_mean(sum(bbox_avg_factors)).clamp_(min=1).item()
        if stages is not None:
            for lvl in range(len(cls_scores)):
                stages[f"decoded_bboxes.{lvl}"] = decoded_bboxes[lvl]
                for k in ("labels", "label_weights", "bbox_targets", "assign_metrics"):
                    stages[f"target_{k}.{lvl}"] = t[k][lvl]
                stages.update({f"loss_raw_cls.{lvl}": losses_cls[lvl], f"loss_raw_bbox.{lvl}": losses_bbox[lvl],
                               f"avg_cls_part.{lvl}": cls_avg_factors[lvl],
                               f"avg_bbox_part.{lvl}": bbox_avg_factors[lvl]})
            stages.update(cls_avg_factor=cls_avg_factor, bbox_avg_factor=bbox_avg_factor)
        t["losses_cls"] = [loss / cls_avg_factor for loss in losses_cls]
        t["losses_bbox"] = [loss / bbox_avg_factor for loss in losses_bbox]
        return t

    def get_targets(self, cls_scores, bbox_preds, anchor_list, valid_flag_list, batch_gt_instances,
                    batch_img_metas, stages=None):
        """cls_scores (N, A, C) / bbox_preds (N, A, 4) over all priors (detached here) -> dict of per-level
        (N, A_l, ...) ``labels``, ``label_weights``, ``bbox_targets``, ``assign_metrics``, and per image
        ``assign_results``, ``sampling_results`` (indices into that image's valid priors), ``inside_flags``."""
        num_level_anchors = [anchors.size(0) for anchors in anchor_list[0]]
        results = []
        for i, (scores, bboxes, anchors, flags, gt, meta) in enumerate(zip(
                cls_scores.detach(), bbox_preds.detach(), anchor_list, valid_flag_list, batch_gt_instances,
                batch_img_metas)):
            img_stages = None if stages is None else {}
            results.append(self._get_targets_single(scores, bboxes, torch.cat(anchors), torch.cat(flags), gt, meta,
                                                    img_stages))
            if stages is not None:
                ar, sr = results[-1][4], results[-1][5]
                stages[f"valid_flags_img{i}"] = torch.cat(flags)
                stages.update({f"assign_img{i}_{k}": v for k, v in img_stages.items()})
                stages.update({f"assign_img{i}_gt_inds": ar.gt_inds, f"assign_img{i}_labels": ar.labels,
                               f"assign_img{i}_max_overlaps": ar.max_overlaps,
                               f"sample_img{i}_pos_inds": sr.pos_inds,
                               f"sample_img{i}_pos_assigned_gt_inds": sr.pos_assigned_gt_inds})
        labels, label_weights, bbox_targets, assign_metrics, assign_results, sampling_results, inside = zip(*results)
        if stages is not None:
            stages["priors"] = torch.cat(anchor_list[0])
            stages.update(assign_results=assign_results, sampling_results=sampling_results, inside_flags=inside)
        return dict(labels=images_to_levels(list(labels), num_level_anchors),
                    label_weights=images_to_levels(list(label_weights), num_level_anchors),
                    bbox_targets=images_to_levels(list(bbox_targets), num_level_anchors),
                    assign_metrics=images_to_levels(list(assign_metrics), num_level_anchors),
                    assign_results=assign_results, sampling_results=sampling_results, inside_flags=inside)

    def _get_targets_single(self, cls_scores, bbox_preds, flat_anchors, valid_flags, gt, img_meta, stages=None):
        inside_flags = anchor_inside_flags(flat_anchors, valid_flags, img_meta["img_shape"][:2],
                                           self.train_cfg.allowed_border)
        if not inside_flags.any():
            raise ValueError("No valid anchors inside image boundary")  # visdet's get_targets (upstream: None)
        anchors = flat_anchors[inside_flags, :]
        pred_bboxes = bbox_preds[inside_flags, :]
        if stages is not None:
            stages["pred_bboxes"] = pred_bboxes
        assign_result = self.assigner.assign(anchors, pred_bboxes, cls_scores[inside_flags, :], gt["bboxes"],
                                             gt["labels"], gt.get("masks"), stages)
        sampling_result = self.sampler.sample(assign_result, anchors, gt["bboxes"])
        n = anchors.shape[0]
        bbox_targets = torch.zeros_like(anchors)
        labels = anchors.new_full((n,), self.num_classes, dtype=torch.long)
        label_weights = anchors.new_zeros(n, dtype=torch.float)
        assign_metrics = anchors.new_zeros(n, dtype=assign_result.max_overlaps.dtype)  # float32 unless run in float64
        pos_inds, neg_inds = sampling_result.pos_inds, sampling_result.neg_inds
        if len(pos_inds) > 0:
            bbox_targets[pos_inds, :] = sampling_result.pos_gt_bboxes
            labels[pos_inds] = sampling_result.pos_gt_labels
            pos_weight = self.train_cfg.pos_weight
            label_weights[pos_inds] = 1.0 if pos_weight <= 0 else pos_weight
            # visdet loops over the assigned GTs; every positive gets its own matched IoU either way
            assign_metrics[pos_inds] = assign_result.max_overlaps[pos_inds]
        if len(neg_inds) > 0:
            label_weights[neg_inds] = 1.0
        total = flat_anchors.size(0)
        return (unmap(labels, total, inside_flags, fill=self.num_classes), unmap(label_weights, total, inside_flags),
                unmap(bbox_targets, total, inside_flags), unmap(assign_metrics, total, inside_flags),
                assign_result, sampling_result, inside_flags)

    def loss_by_feat_single(self, cls_score, bbox_pred, labels, label_weights, bbox_targets, assign_metrics, stride):
        """One level, both images: cls_score (N, C, H, W) logits, bbox_pred (N, H*W, 4) decoded boxes. Returns
        (QFL sum, weighted GIoU sum, sum of assign_metrics, sum of the positives' assign_metrics)."""
        if stride[0] != stride[1]:
            raise ValueError("h stride is not equal to w stride")
        cls_score = cls_score.permute(0, 2, 3, 1).reshape(-1, self.cls_out_channels).contiguous()
        bbox_pred = bbox_pred.reshape(-1, 4)
        bbox_targets = bbox_targets.reshape(-1, 4)
        labels = labels.reshape(-1)
        assign_metrics = assign_metrics.reshape(-1)
        label_weights = label_weights.reshape(-1)
        loss_cls = self.loss_cls(cls_score, (labels, assign_metrics), label_weights, avg_factor=1.0)
        pos_inds = ((labels >= 0) & (labels < self.num_classes)).nonzero().squeeze(1)
        if len(pos_inds) > 0:
            pos_bbox_weight = assign_metrics[pos_inds]
            loss_bbox = self.loss_bbox(bbox_pred[pos_inds], bbox_targets[pos_inds], weight=pos_bbox_weight,
                                       avg_factor=1.0)
        else:
            loss_bbox = bbox_pred.sum() * 0
            pos_bbox_weight = bbox_targets.new_tensor(0.0)
        return loss_cls, loss_bbox, assign_metrics.sum(), pos_bbox_weight.sum()


class RTMDetSepBNHead(RTMDetHead):
    def __init__(self, cfg: RTMDetSepBNHeadCfg):
        self.share_conv, self.use_depthwise, self.exp_on_reg = cfg.share_conv, cfg.use_depthwise, cfg.exp_on_reg
        super().__init__(cfg)

    def _init_layers(self):
        conv = DepthwiseSeparableConvModule if self.use_depthwise else ConvModule
        levels = range(len(self.prior_generator.strides))
        self.cls_convs = nn.ModuleList([self._tower(conv) for _ in levels])
        self.reg_convs = nn.ModuleList([self._tower(conv) for _ in levels])
        self.rtm_cls = nn.ModuleList([self._pred(self.num_base_priors * self.cls_out_channels) for _ in levels])
        self.rtm_reg = nn.ModuleList([self._pred(self.num_base_priors * 4) for _ in levels])
        if self.with_objectness:
            self.rtm_obj = nn.ModuleList([self._pred(1) for _ in levels])
        self._share_convs()

    def _share_convs(self):
        if self.share_conv:
            for n in range(len(self.prior_generator.strides)):
                for i in range(self.stacked_convs):
                    self.cls_convs[n][i].conv = self.cls_convs[0][i].conv
                    self.reg_convs[n][i].conv = self.reg_convs[0][i].conv

    def forward(self, feats):
        cls_scores, bbox_preds = [], []
        for idx, (x, stride) in enumerate(zip(feats, self.prior_generator.strides)):
            cls_score = self.rtm_cls[idx](self._run(self.cls_convs[idx], x))
            reg_feat = self._run(self.reg_convs[idx], x)
            if self.with_objectness:
                cls_score = inverse_sigmoid(sigmoid_geometric_mean(cls_score, self.rtm_obj[idx](reg_feat)))
            reg = self.rtm_reg[idx](reg_feat)
            cls_scores.append(cls_score)
            bbox_preds.append(reg.exp() * stride[0] if self.exp_on_reg else reg * stride[0])
        return tuple(cls_scores), tuple(bbox_preds)
