"""flaxdet's models, laid out like visdet's ``models/``; :func:`build_detector` builds one from its config."""
from __future__ import annotations

from flax import nnx

from flaxdet.config import ConfigError, TwoStageDetectorCfg
from flaxdet.models.detectors.cascade_rcnn import CascadeRCNN
from flaxdet.models.detectors.rtmdet import RTMDet
from flaxdet.models.detectors.two_stage import FasterRCNN, MaskRCNN, TwoStageDetector

DETECTORS = {"TwoStageDetector": TwoStageDetector, "FasterRCNN": FasterRCNN, "MaskRCNN": MaskRCNN,
             "CascadeRCNN": CascadeRCNN, "RTMDet": RTMDet}


def build_detector(cfg: TwoStageDetectorCfg, seed: int = 0) -> TwoStageDetector:
    """A detector with torch-default initialised weights (``seed``) for a parsed config."""
    if cfg.TYPE not in DETECTORS:
        raise ConfigError(f"detector type {cfg.TYPE!r} is not supported by flaxdet yet (have {sorted(DETECTORS)})")
    return DETECTORS[cfg.TYPE](cfg, rngs=nnx.Rngs(seed))
