"""CascadeRCNN (visdet ``models/detectors/cascade_rcnn.py``): a TwoStageDetector with a CascadeRoIHead."""
from __future__ import annotations

from flaxdet_reference.models.detectors.two_stage import TwoStageDetector


class CascadeRCNN(TwoStageDetector):
    def loss(self, images, img_metas, gt_instances, inject=None, generator=None, stages=None):
        """``TwoStageDetector.loss``; the cascade refines RoIs between stages clipped to each image's
        ``img_shape`` (visdet passes ``batch_img_metas`` to ``refine_bboxes``), so the RoI head gets them."""
        self.roi_head.train_img_shapes = [tuple(m.get("img_shape", im.shape[-2:]))[:2]
                                          for im, m in zip(images, img_metas)]
        try:
            return super().loss(images, img_metas, gt_instances, inject=inject, generator=generator, stages=stages)
        finally:
            self.roi_head.train_img_shapes = None
