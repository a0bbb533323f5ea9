"""Official (Microsoft ``Swin-Transformer``) checkpoints -> visdet's Swin keys and layouts.

visdet's ``SwinTransformer`` loads such ImageNet checkpoints through ``swin_converter`` when
``convert_weights=True``. This is the same mapping, written for our strict converter:

=====================================================  ============================================
official key                                           visdet key (``backbone.`` + ...)
=====================================================  ============================================
``patch_embed.proj.*``, ``patch_embed.norm.*``         unchanged (visdet's PatchEmbed conv is ``proj``)
``layers.{s}.blocks.{b}.attn.{qkv,proj,relative_*}``   ``stages.{s}.blocks.{b}.attn.w_msa.*``
``layers.{s}.blocks.{b}.mlp.fc1.*`` / ``mlp.fc2.*``    ``stages.{s}.blocks.{b}.ffn.layers.0.0.*`` / ``ffn.layers.1.*``
``layers.{s}.blocks.{b}.norm{1,2}.*``                  ``stages.{s}.blocks.{b}.norm{1,2}.*``
``layers.{s}.downsample.reduction.weight``             ``stages.{s}.downsample.reduction.weight``, inputs permuted
``layers.{s}.downsample.norm.*``                       ``stages.{s}.downsample.norm.*``, permuted
=====================================================  ============================================

Channel order of PatchMerging: the official model concatenates the 2x2 neighbours neighbour-major,
``[x(0,0), x(1,0), x(0,1), x(1,1)]`` (channel ``k*C + c``); visdet's unfold layout is channel-major with
neighbours in raster order ``(0,0), (0,1), (1,0), (1,1)`` (channel ``c*4 + k'``). Official neighbour
``k = (0, 2, 1, 3)[k']``.

Not converted (returned as leftovers, so a strict load reports them as unexpected): the classifier
``head.*``, the classifier's final ``norm.*`` (visdet's detection ``norm0..3`` are separate layers; visdet's
own converter keeps ``backbone.norm.*``, which its non-strict loader then ignores) and the shifted blocks'
``attn_mask`` buffers (specific to the 224x224 pretraining input; the mask is recomputed per input).
Deviation from visdet: ``swin_converter`` renames ``patch_embed.proj`` to the upstream-mmdet
``patch_embed.projection``, a key visdet's own PatchEmbed does not have, so visdet silently leaves the
patch embedding at its random init; here it keeps visdet's key ``proj`` and is loaded.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

# official neighbour index for each visdet (unfold-order) neighbour k' = 0..3
_UNFOLD_TO_OFFICIAL = (0, 2, 1, 3)

_BLOCK_RENAMES = (("attn.", "attn.w_msa."), ("mlp.fc1.", "ffn.layers.0.0."), ("mlp.fc2.", "ffn.layers.1."))
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def merge_order_to_unfold(x: np.ndarray) -> np.ndarray:
    """Last axis of 4*C entries in the official neighbour-major order -> visdet's channel-major order."""
    c = x.shape[-1] // 4
    official = x.reshape(*x.shape[:-1], 4, c)  # (..., k, c)
    return np.ascontiguousarray(
        np.stack([official[..., k, :] for k in _UNFOLD_TO_OFFICIAL], axis=-1)  # (..., c, k')
    ).reshape(x.shape)


def is_official_swin(state_dict) -> bool:
    """The Microsoft layout: ``layers.N.blocks`` keys (visdet/mmdet use ``backbone.stages.N``)."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    return any(k.startswith("layers.") and ".blocks." in k for k in keys)


def official_swin_to_visdet(state_dict, prefix: str = "backbone."):
    """Returns (converted, leftovers): ``converted`` maps visdet keys (with ``prefix``) to arrays in
    visdet's layout; ``leftovers`` holds the source keys that have no visdet counterpart (see module doc).
    A leading ``module.`` (DDP) is stripped."""
    converted, leftovers = OrderedDict(), OrderedDict()
    for key, value in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        v = np.asarray(value)
        m = _LAYER.match(k)
        if k.startswith("patch_embed."):
            converted[prefix + k] = v
        elif m is not None and k.endswith("attn_mask"):
            leftovers[key] = v
        elif m is not None:
            stage, rest = m.groups()
            if rest.startswith("downsample."):
                if rest in ("downsample.reduction.weight", "downsample.norm.weight", "downsample.norm.bias"):
                    v = merge_order_to_unfold(v)
                else:
                    leftovers[key] = v
                    continue
            else:
                for a, b in _BLOCK_RENAMES:
                    if a in rest:
                        rest = rest.replace(a, b, 1)
                        break
            converted[f"{prefix}stages.{stage}.{rest}"] = v
        else:  # head.*, norm.*, absolute_pos_embed handled below
            if k == "absolute_pos_embed":
                converted[prefix + k] = v
            else:
                leftovers[key] = v
    return converted, leftovers
