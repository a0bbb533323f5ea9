"""RTMDet (visdet ``models/detectors/rtmdet.py``): a SingleStageDetector. ``use_syncbn`` only converts BN to
SyncBN when distributed; on one process SyncBN is plain BatchNorm, which the reference always builds."""
from __future__ import annotations

from flaxdet_reference.models.detectors.single_stage import SingleStageDetector


class RTMDet(SingleStageDetector):
    """Built from an ``RTMDetCfg``."""
