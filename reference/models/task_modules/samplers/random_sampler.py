"""RandomSampler + SamplingResult (visdet ``task_modules/samplers/__init__.py``).

Up to ``int(num * pos_fraction)`` positives, negatives fill up to ``num`` (capped by ``neg_pos_ub``
times the positives when >= 0); a random subset is ``gallery[randperm(n)[:num]]``, and both index
sets end up ``unique()``-sorted. visdet draws ``randperm`` from the global torch RNG; here a
``torch.Generator`` may be passed, or ``inject`` replays recorded ``pos_inds``/``neg_inds`` (indices
into the candidates: the valid anchors for the RPN, ``[GTs; proposals]`` with ``add_gt_as_proposals``).
"""
from __future__ import annotations

import torch

from flaxdet.config import RandomSamplerCfg


class SamplingResult:
    def __init__(self, pos_inds, neg_inds, priors, gt_bboxes, assign_result, gt_flags):
        self.pos_inds = pos_inds
        self.neg_inds = neg_inds
        self.num_pos = max(pos_inds.numel(), 1)
        self.num_neg = max(neg_inds.numel(), 1)
        self.avg_factor = self.num_pos + self.num_neg
        self.pos_priors = priors[pos_inds]
        self.neg_priors = priors[neg_inds]
        self.pos_is_gt = gt_flags[pos_inds]
        self.num_gts = gt_bboxes.shape[0]
        self.pos_assigned_gt_inds = assign_result.gt_inds[pos_inds] - 1
        self.pos_gt_labels = assign_result.labels[pos_inds]
        if gt_bboxes.numel() == 0:
            assert self.pos_assigned_gt_inds.numel() == 0
            self.pos_gt_bboxes = gt_bboxes.view(-1, 4)
        else:
            self.pos_gt_bboxes = gt_bboxes.view(-1, 4)[self.pos_assigned_gt_inds.long()]

    @property
    def priors(self):
        return torch.cat([self.pos_priors, self.neg_priors])


class RandomSampler:
    def __init__(self, cfg: RandomSamplerCfg):
        self.cfg = cfg
        self.num = cfg.num
        self.pos_fraction = cfg.pos_fraction
        self.neg_pos_ub = cfg.neg_pos_ub
        self.add_gt_as_proposals = cfg.add_gt_as_proposals

    @staticmethod
    def random_choice(gallery, num, generator=None):
        assert len(gallery) >= num
        perm = torch.randperm(gallery.numel(), generator=generator, device=gallery.device)[:num]
        return gallery[perm]

    def _sample(self, candidates, num_expected, generator):
        inds = torch.nonzero(candidates, as_tuple=False).squeeze(1)
        return inds if inds.numel() <= num_expected else self.random_choice(inds, num_expected, generator)

    def sample(self, assign_result, priors, gt_bboxes, gt_labels, generator=None, inject=None):
        """Returns a SamplingResult. ``inject``: dict(pos_inds, neg_inds) replacing the random draws."""
        bboxes = priors[:, :4]
        gt_flags = bboxes.new_zeros((bboxes.shape[0],), dtype=torch.uint8)
        if self.add_gt_as_proposals and len(gt_bboxes) > 0:
            bboxes = torch.cat([gt_bboxes, bboxes], dim=0)
            assign_result.add_gt_(gt_labels)
            gt_flags = torch.cat([bboxes.new_ones(gt_bboxes.shape[0], dtype=torch.uint8), gt_flags])
        num_expected_pos = int(self.num * self.pos_fraction)
        if inject is not None:
            pos_inds = torch.as_tensor(inject["pos_inds"], dtype=torch.long).reshape(-1)
        else:
            pos_inds = self._sample(assign_result.gt_inds > 0, num_expected_pos, generator)
        pos_inds = pos_inds.unique()
        num_expected_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            num_expected_neg = min(num_expected_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        if inject is not None:
            neg_inds = torch.as_tensor(inject["neg_inds"], dtype=torch.long).reshape(-1)
        else:
            neg_inds = self._sample(assign_result.gt_inds == 0, num_expected_neg, generator)
        neg_inds = neg_inds.unique()
        if inject is not None and not ((assign_result.gt_inds[pos_inds] > 0).all()
                                       and (assign_result.gt_inds[neg_inds] == 0).all()):
            raise ValueError("injected samples do not fit the assignment (wrong index space?)")
        return SamplingResult(pos_inds, neg_inds, bboxes, gt_bboxes, assign_result, gt_flags)
