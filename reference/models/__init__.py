"""Reference model construction and checkpoint loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flaxdet.config import DetectorCfg, load_config, parse_model_config, with_num_classes
from flaxdet_reference.models.detectors.cascade_rcnn import CascadeRCNN
from flaxdet_reference.models.detectors.rtmdet import RTMDet
from flaxdet_reference.models.detectors.two_stage import FasterRCNN, MaskRCNN, TwoStageDetector

DETECTORS = {"TwoStageDetector": TwoStageDetector, "FasterRCNN": FasterRCNN, "MaskRCNN": MaskRCNN,
             "CascadeRCNN": CascadeRCNN, "RTMDet": RTMDet}


def _as_config(cfg) -> DetectorCfg:
    if isinstance(cfg, dict):
        return parse_model_config(cfg)
    return cfg if isinstance(cfg, DetectorCfg) else load_config(cfg)


def build_detector(cfg) -> torch.nn.Module:
    """Build from a config dataclass (two-stage or RTMDet), a parsed dict, a preset name or a YAML path."""
    cfg = _as_config(cfg)
    if cfg.TYPE not in DETECTORS:
        raise ValueError(f"detector type {cfg.TYPE!r} is not supported (have {sorted(DETECTORS)})")
    return DETECTORS[cfg.TYPE](cfg).eval()


class ArchitectureMismatch(ValueError):
    """A checkpoint whose keys or shapes do not fit the model built from the config."""


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint"):
    """strict=True load with an error that names missing/unexpected/misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshapen = [f"{k}: checkpoint {tuple(np.shape(state_dict[k]))} vs model {tuple(own[k].shape)}"
                 for k in own if k in state_dict and tuple(np.shape(state_dict[k])) != tuple(own[k].shape)]
    if missing or unexpected or misshapen:
        def show(xs):
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        lines = [f"{source} does not fit the {type(model).__name__} built from the config "
                 f"({len(own)} keys expected, {len(state_dict)} found)."]
        if missing:
            lines.append(f"  missing ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {show(unexpected)}")
        if misshapen:
            lines.append(f"  misshapen ({len(misshapen)}): {show(misshapen)}")
        lines.append("  Is this checkpoint of another architecture (depth, channels, classes, heads)?")
        raise ArchitectureMismatch("\n".join(lines))
    tensors = {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True)
    return model


def load_detector(config, checkpoint) -> tuple[torch.nn.Module, list | None]:
    """Build from ``config`` and load ``checkpoint`` (.pth / runner .pth / .safetensors) strictly.
    Returns (model in eval mode, class names or None). An RTMDet config without ``bbox_head.num_classes``
    (visdet's presets) takes it from the checkpoint's ``bbox_head.rtm_cls.0.weight``."""
    from flaxdet_converters.checkpoint_io import load_checkpoint

    ck = load_checkpoint(checkpoint)
    cfg = with_num_classes(_as_config(config), ck.state_dict, source=str(checkpoint), log=lambda *_: None)
    model = build_detector(cfg)
    load_state_dict_strict(model, ck.state_dict, source=str(Path(checkpoint)))
    return model, ck.classes
