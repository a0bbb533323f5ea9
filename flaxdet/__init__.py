"""flaxdet: a weight-compatible JAX/Flax port of visdet (MMDetection 3.x fork).

The public API (:mod:`flaxdet.api`): ``flaxdet.load``, ``convert``, ``export``, ``train`` / ``TrainConfig``,
``evaluate``, ``Detector`` / ``Detections``; the fast-path switch ``flaxdet.fast_paths``. They are imported
on first use, so ``import flaxdet`` (and the ``flaxdet`` command's start) stays cheap: no JAX until needed.
The config layer (:mod:`flaxdet.config`) is pure Python and shared with the PyTorch reference.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {name: "flaxdet.api" for name in ("Detections", "Detector", "TrainConfig", "convert", "evaluate", "export",
                                          "load", "train")}
__all__ = sorted(_LAZY) + ["fast_paths"]


def __getattr__(name):
    if name == "fast_paths":
        return importlib.import_module("flaxdet.fast_paths")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flaxdet' has no attribute {name!r}")
