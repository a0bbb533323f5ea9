"""CascadeRCNN (visdet ``models/detectors/cascade_rcnn.py``): a TwoStageDetector whose roi_head is a
CascadeRoIHead (the stages, their refinement and per-stage losses live there)."""
from __future__ import annotations

from flaxdet.models.detectors.two_stage import TwoStageDetector


class CascadeRCNN(TwoStageDetector):
    pass
