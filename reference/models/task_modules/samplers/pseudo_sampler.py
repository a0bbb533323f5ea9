"""PseudoSampler (visdet ``task_modules/samplers/__init__.py``): no sampling -- positives are every prior with
``gt_inds > 0``, negatives every prior with ``gt_inds == 0``, both in ascending order (RTMDet's sampler)."""
from __future__ import annotations

import torch

from flaxdet_reference.models.task_modules.samplers.random_sampler import SamplingResult


class PseudoSampler:
    def sample(self, assign_result, priors, gt_bboxes):
        pos_inds = torch.nonzero(assign_result.gt_inds > 0, as_tuple=False).squeeze(-1)
        neg_inds = torch.nonzero(assign_result.gt_inds == 0, as_tuple=False).squeeze(-1)
        gt_flags = priors.new_zeros(priors.shape[0], dtype=torch.uint8)
        return SamplingResult(pos_inds, neg_inds, priors, gt_bboxes, assign_result, gt_flags)
