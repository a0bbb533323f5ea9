"""RTMDet (visdet ``models/detectors/rtmdet.py``): a SingleStageDetector (CSPNeXt, CSPNeXtPAFPN and an
RTMDet(Ins)SepBNHead in the presets). ``use_syncbn`` only converts BN to SyncBN on several processes in visdet:
identical at inference, nothing to do here."""
from __future__ import annotations

from flaxdet.models.detectors.single_stage import SingleStageDetector


class RTMDet(SingleStageDetector):
    pass
