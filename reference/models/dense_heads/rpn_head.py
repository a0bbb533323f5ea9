"""RPNHead (visdet ``models/dense_heads/rpn_head.py`` + ``anchor_head.py``): test path, and the training
losses (:class:`AnchorHead`) with visdet's names ``loss_rpn_cls`` / ``loss_rpn_bbox`` (lists over levels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms as tv_nms

from flaxdet.config import RPNHeadCfg, RPNProposalCfg
from flaxdet_reference.models.dense_heads.anchor_head import AnchorHead
from flaxdet_reference.models.layers import ConvModule
from flaxdet_reference.models.task_modules.coders.delta_xywh_bbox_coder import DeltaXYWHBBoxCoder
from flaxdet_reference.models.task_modules.prior_generators.anchor_generator import AnchorGenerator


def rpn_batched_nms(boxes, scores, level_ids, iou_threshold):
    """rpn_head.py's own local batched_nms: level offsets, one torchvision nms, never split."""
    offsets = level_ids.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    keep = tv_nms(boxes + offsets[:, None], scores, iou_threshold)
    return keep


class RPNHead(AnchorHead):
    def __init__(self, cfg: RPNHeadCfg):
        super().__init__()
        self.cfg = cfg
        self.prior_generator = AnchorGenerator(cfg.anchor_generator)
        self.bbox_coder = DeltaXYWHBBoxCoder(cfg.bbox_coder)
        self.use_sigmoid_cls = getattr(cfg.loss_cls, "use_sigmoid", False)
        self.num_classes = cfg.num_classes
        self.cls_out_channels = cfg.num_classes if self.use_sigmoid_cls else cfg.num_classes + 1
        self.num_base_priors = self.prior_generator.num_base_priors[0]
        if cfg.num_convs > 1:
            self.rpn_conv = nn.Sequential(*[
                ConvModule(cfg.in_channels if i == 0 else cfg.feat_channels, cfg.feat_channels, 3,
                           padding=1, inplace=False) for i in range(cfg.num_convs)])
        else:
            self.rpn_conv = nn.Conv2d(cfg.in_channels, cfg.feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(cfg.feat_channels, self.num_base_priors * self.cls_out_channels, 1)
        self.rpn_reg = nn.Conv2d(cfg.feat_channels, self.num_base_priors * 4, 1)
        self.init_train(cfg)

    def forward_single(self, x):
        x = F.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)

    def forward(self, feats):
        outs = [self.forward_single(x) for x in feats]
        return [o[0] for o in outs], [o[1] for o in outs]

    def loss_by_feat(self, cls_scores, bbox_preds, gts, img_metas, generator=None, inject=None, stages=None):
        losses = super().loss_by_feat(cls_scores, bbox_preds, gts, img_metas, generator, inject, stages)
        return {"loss_rpn_cls": losses["loss_cls"], "loss_rpn_bbox": losses["loss_bbox"]}

    def loss_and_predict(self, x, gts, img_metas, proposal_cfg, generator=None, inject=None, stages=None):
        """Losses and train-mode proposals (from detached head outputs) -- visdet's
        ``BaseDenseHead.loss_and_predict``."""
        cls_scores, bbox_preds = self(x)
        losses = self.loss_by_feat(cls_scores, bbox_preds, gts, img_metas, generator, inject, stages)
        if stages is not None:
            stages["rpn_head.cls_score"], stages["rpn_head.bbox_pred"] = cls_scores, bbox_preds
        return losses, self.predict_by_feat(cls_scores, bbox_preds, img_metas, proposal_cfg)

    def predict_by_feat(self, cls_scores, bbox_preds, img_metas, cfg: RPNProposalCfg):
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = self.prior_generator.grid_priors(sizes, cls_scores[0].dtype, cls_scores[0].device)
        return [self._predict_single([c[i].detach() for c in cls_scores], [b[i].detach() for b in bbox_preds],
                                     priors, meta, cfg) for i, meta in enumerate(img_metas)]

    def _predict_single(self, cls_list, reg_list, mlvl_priors, img_meta, cfg: RPNProposalCfg):
        """Returns dict(bboxes (N,4) resized-image frame, scores (N,), labels zeros)."""
        nms_pre = cfg.nms_pre
        all_reg, all_priors, all_scores, level_ids = [], [], [], []
        for lvl, (cls, reg, priors) in enumerate(zip(cls_list, reg_list, mlvl_priors)):
            reg = reg.permute(1, 2, 0).reshape(-1, 4)
            cls = cls.permute(1, 2, 0).reshape(-1, self.cls_out_channels)
            scores = cls.sigmoid() if self.use_sigmoid_cls else cls.softmax(-1)[:, :-1]
            scores = scores.reshape(-1) if scores.dim() > 1 and scores.shape[1] == 1 else torch.squeeze(scores)
            # (visdet squeezes, which turns a level with a single anchor into a 0-d tensor and crashes)
            if 0 < nms_pre < scores.shape[0]:
                ranked, rank_inds = scores.sort(descending=True)
                topk = rank_inds[:nms_pre]
                scores, reg, priors = ranked[:nms_pre], reg[topk, :], priors[topk]
            all_reg.append(reg)
            all_priors.append(priors)
            all_scores.append(scores)
            level_ids.append(scores.new_full((scores.size(0),), lvl, dtype=torch.long))
        bboxes = self.bbox_coder.decode(torch.cat(all_priors), torch.cat(all_reg),
                                        max_shape=img_meta["img_shape"])
        scores = torch.cat(all_scores)
        level_ids = torch.cat(level_ids)
        if cfg.min_bbox_size >= 0:
            w = bboxes[:, 2] - bboxes[:, 0]
            h = bboxes[:, 3] - bboxes[:, 1]
            valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
            if not valid.all():
                bboxes, scores, level_ids = bboxes[valid], scores[valid], level_ids[valid]
        if bboxes.numel() > 0:
            keep = rpn_batched_nms(bboxes, scores, level_ids, cfg.nms.iou_threshold)[: cfg.max_per_img]
            bboxes, scores = bboxes[keep], scores[keep]
        else:
            bboxes, scores = bboxes.new_zeros((0, 4)), scores.new_zeros(0)
        return dict(bboxes=bboxes, scores=scores, labels=scores.new_zeros(len(scores), dtype=torch.long))
