"""DetDataPreprocessor (visdet ``models/data_preprocessors/data_preprocessor.py``), inference part:
BGR->RGB on the uint8 tensor, float, (x-mean)/std, zero pad bottom/right to a multiple of 32."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flaxdet.config import DetDataPreprocessorCfg


class DetDataPreprocessor(nn.Module):
    def __init__(self, cfg: DetDataPreprocessorCfg):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(-1, 1, 1), persistent=False)

    def forward(self, images):
        """images: list of (3,H,W) uint8 tensors in the loader's channel order (BGR for cv2).
        Returns (batch (N,3,Hp,Wp) float32, batch_input_shape (Hp, Wp))."""
        cfg = self.cfg
        outs = []
        for img in images:
            if cfg.bgr_to_rgb or cfg.rgb_to_bgr:
                img = img[[2, 1, 0], ...]
            img = img.float()
            outs.append((img - self.mean) / self.std)
        d = cfg.pad_size_divisor
        h = max(o.shape[1] for o in outs)
        w = max(o.shape[2] for o in outs)
        hp, wp = int(math.ceil(h / d)) * d, int(math.ceil(w / d)) * d
        batch = torch.stack([F.pad(o, (0, wp - o.shape[2], 0, hp - o.shape[1]), value=cfg.pad_value)
                             for o in outs])
        return batch, (hp, wp)
