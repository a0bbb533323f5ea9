"""Mask R-CNN Swin against the recorded visdet golden ``mask_rcnn_tiny_swin`` (Swin embed 32, depths 2-2-2-2,
heads 1-2-4-8, window 7; FPN 32; 4 classes; three images).

(a) reference/ loads the golden state_dict strictly and reproduces every recorded stage, teacher-forced and
    end to end (the R18/R50 test bodies of test_reference_goldens, on this case);
(b) flaxdet converted from each of the three weight files, end to end under jit (Detector / make_batch /
    unpad), compared stage by stage with flaxdet.parity.harness.compare_stages;
(c) visdet -> flaxdet -> visdet is bit-identical (keys, order, dtypes -- relative_position_index stays int64);
(d) official (Microsoft) Swin checkpoints: a checkpoint built in that layout from the golden backbone
    converts back to the golden tensors, and its PatchMerging channel order computes the same function.
Tolerances: flaxdet.parity.TOLERANCES (no Swin-specific entry was needed).
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from flaxdet.config import load_config
from flaxdet.inference import make_batch, unpad
from flaxdet.models import build_detector
from flaxdet.parity import format_table
from flaxdet.parity.harness import compare_stages, flaxdet_stages, geometry_of
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import ConversionError, export_visdet_state_dict, load_visdet_state_dict
from flaxdet_converters.swin import is_official_swin, official_swin_to_visdet
from parity_tests import test_flaxdet_goldens as flaxdet_goldens
from parity_tests import test_reference_goldens as reference_goldens
from parity_tests.goldens import GOLDENS, IMAGES, WEIGHT_FILES, config_path, golden_image, require_goldens

SWIN = "mask_rcnn_tiny_swin"


def _sd(weights="state_dict.pth"):
    require_goldens()
    return load_checkpoint(GOLDENS / SWIN / weights).state_dict


# ----------------------------------------------------------------------------- (a) reference/
@pytest.mark.goldens
@pytest.mark.parametrize("image", IMAGES)
def test_reference_teacher_forced(image):
    reference_goldens.test_teacher_forced_stages(SWIN, image)


@pytest.mark.goldens
@pytest.mark.parametrize("image", IMAGES)
def test_reference_end_to_end(image):
    reference_goldens.test_end_to_end(SWIN, image)


@pytest.mark.goldens
def test_reference_keys_are_the_golden_keys():
    m = reference_goldens.model_for(SWIN)
    own = m.state_dict()
    sd = _sd()
    assert sorted(own) == sorted(sd)
    bb = [k for k in sd if k.startswith("backbone.")]
    assert [k for k in own if k.startswith("backbone.")] == bb  # visdet's backbone key order
    idx = "backbone.stages.0.blocks.1.attn.w_msa.relative_position_index"
    assert own[idx].dtype == torch.int64 and np.array_equal(own[idx].numpy(), sd[idx])


# ----------------------------------------------------------------------------- (b) flaxdet, jit
@functools.lru_cache(maxsize=None)
def _state(weights):
    """flaxdet variables converted (strictly) from one golden weight file."""
    model = build_detector(load_config(config_path(SWIN)))
    report = load_visdet_state_dict(model, _sd(weights))
    assert report.ok and len(report.converted) == len(_sd(weights))
    return nnx.split(model)[1]


def _e2e_params():
    """state_dict.pth on every image; the other weight files (same tensors in other containers; they
    reuse the compiled function) on the resized COCO image by default, on all images under -m slow."""
    out = []
    for image in IMAGES:
        for weights in WEIGHT_FILES:
            slow = image != "coco_test_12510"
            out.append(pytest.param(image, weights, marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.goldens
@pytest.mark.parametrize("image,weights", _e2e_params())
def test_flaxdet_end_to_end_jit(image, weights):
    g = golden_image(SWIN, image)
    det = flaxdet_goldens.detector(SWIN)  # Detector: nnx.split model + jit cache per shape bucket
    batch = make_batch([g["input_bgr_uint8"]], [g.meta])
    canvas = batch.canvas_hw
    dets, stages = jax.device_get(det._predict(_state(weights), batch.images, batch.img_shapes, batch.scale_factors,
                                               canvas, True, True))
    ours = flaxdet_stages(stages, unpad(dets, batch)[0])
    bgeo, mgeo = geometry_of(det.cfg)
    rows = compare_stages(ours, g.arrays, bbox_geometry=bgeo, mask_geometry=mgeo, scale_factor=g.meta["scale_factor"])
    assert all(r.passed for r in rows), "\n" + format_table(rows)
    assert ours["_n_proposals"] == len(g["proposals.bboxes"])
    assert len(ours["det.bboxes"]) == len(g["det.bboxes"])
    np.testing.assert_array_equal(ours["det.labels"], g["det.labels"])


@pytest.mark.goldens
@pytest.mark.slow
@pytest.mark.parametrize("image", IMAGES)
def test_flaxdet_teacher_forced(image):
    flaxdet_goldens.test_teacher_forced_stages(SWIN, image)


# ----------------------------------------------------------------------------- (c) round trip
@pytest.mark.goldens
@pytest.mark.parametrize("weights", WEIGHT_FILES)
def test_round_trip_bit_identical(weights):
    sd = _sd(weights)
    model = build_detector(load_config(config_path(SWIN)))
    report = load_visdet_state_dict(model, sd)
    assert report.ok and sorted(report.converted) == sorted(sd)
    back = export_visdet_state_dict(model, key_order=list(sd))
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k
    assert back["backbone.stages.3.blocks.1.attn.w_msa.relative_position_index"].dtype == np.int64


@pytest.mark.goldens
def test_mmdet_key_dialect():
    """Upstream MMDetection spells the patch embedding ``patch_embed.projection``."""
    sd = OrderedDict((k.replace(".patch_embed.proj.", ".patch_embed.projection."), v) for k, v in _sd().items())
    model = build_detector(load_config(config_path(SWIN)))
    with pytest.raises(ConversionError):
        load_visdet_state_dict(model, sd)
    report = load_visdet_state_dict(model, sd, key_dialect="mmdet")
    assert report.ok and len(report.renamed) == 2
    np.testing.assert_array_equal(np.asarray(model.backbone.patch_embed.proj.weight[...]),
                                  _sd()["backbone.patch_embed.proj.weight"].transpose(2, 3, 1, 0))


# ----------------------------------------------------------------------------- (d) official Swin layout
def _to_official(sd):
    """The golden backbone in the Microsoft Swin layout (written independently of the converter):
    renames back, PatchMerging channels from visdet's c*4 + k' (raster neighbours (0,0),(0,1),(1,0),(1,1))
    to the official k*C + c with neighbours (0,0),(1,0),(0,1),(1,1); plus what official files also hold:
    the classifier head and final norm, and attn_mask buffers of the shifted blocks."""
    raster_to_official = {0: 0, 1: 2, 2: 1, 3: 3}  # (0,1) is the official 3rd neighbour, (1,0) the 2nd
    out = OrderedDict()
    for k, v in sd.items():
        if not k.startswith("backbone.") or k.startswith("backbone.norm"):
            continue
        k = k[len("backbone."):]
        k = k.replace("stages.", "layers.", 1).replace("attn.w_msa.", "attn.")
        k = k.replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
        if ".downsample." in k:
            c = v.shape[-1] // 4
            perm = np.empty(4 * c, np.int64)  # official channel j holds visdet channel perm[j]
            for ch in range(c):
                for kr in range(4):
                    perm[raster_to_official[kr] * c + ch] = ch * 4 + kr
            v = v[..., perm]
        out[k] = v
        if k.endswith("blocks.1.norm1.bias"):  # shifted block: the official model keeps a 224-input mask
            out[k.replace("norm1.bias", "attn_mask")] = np.zeros((64, 49, 49), np.float32)
    out["norm.weight"], out["norm.bias"] = sd["backbone.norm3.weight"] + 1, sd["backbone.norm3.bias"]
    out["head.weight"], out["head.bias"] = np.zeros((1000, 256), np.float32), np.zeros(1000, np.float32)
    return out


@pytest.mark.goldens
def test_official_swin_checkpoint_converts_back():
    sd = _sd()
    official = _to_official(sd)
    assert is_official_swin(official) and not is_official_swin(sd)
    assert "layers.0.downsample.reduction.weight" in official and "layers.2.blocks.1.mlp.fc2.bias" in official
    converted, leftovers = official_swin_to_visdet(official)
    want = {k: v for k, v in sd.items() if k.startswith("backbone.") and not k.startswith("backbone.norm")}
    assert list(converted) == list(want)
    for k, v in want.items():
        assert converted[k].dtype == v.dtype and np.array_equal(converted[k], v), k
    assert sorted(leftovers) == sorted(["norm.weight", "norm.bias", "head.weight", "head.bias"]
                                       + [f"layers.{s}.blocks.1.attn_mask" for s in range(4)])
    # through the converter's dialect: a backbone-only file, so strict=False; the report says what is left
    model = build_detector(load_config(config_path(SWIN)))
    report = load_visdet_state_dict(model, official, strict=False, key_dialect="swin")
    assert sorted(report.converted) == sorted(want)
    assert sorted(report.unexpected) == sorted(leftovers)
    assert sorted(report.missing) == sorted(k for k in sd if k not in want)
    w = np.asarray(model.backbone.stages[1].downsample.reduction.weight[...])
    np.testing.assert_array_equal(w, sd["backbone.stages.1.downsample.reduction.weight"].T)


def test_official_patch_merging_order_is_the_same_function():
    """The permutation is the right one: the Microsoft PatchMerging (concat [x(0::2,0::2), x(1::2,0::2),
    x(0::2,1::2), x(1::2,1::2)], LN, Linear) with official weights equals reference/'s PatchMerging with
    the converted weights."""
    from flaxdet_reference.models.layers.transformer import PatchMerging

    rng = np.random.default_rng(0)
    c, h, w = 6, 6, 10
    official = OrderedDict([
        ("layers.0.downsample.reduction.weight", rng.normal(size=(2 * c, 4 * c)).astype(np.float32)),
        ("layers.0.downsample.norm.weight", rng.normal(1, 0.2, size=4 * c).astype(np.float32)),
        ("layers.0.downsample.norm.bias", rng.normal(0, 0.2, size=4 * c).astype(np.float32))])
    x = rng.normal(size=(1, h, w, c)).astype(np.float32)
    cat = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    mu, var = cat.mean(-1, keepdims=True), cat.var(-1, keepdims=True)
    normed = (cat - mu) / np.sqrt(var + 1e-5) * official["layers.0.downsample.norm.weight"] \
        + official["layers.0.downsample.norm.bias"]
    want = normed @ official["layers.0.downsample.reduction.weight"].T

    converted, _ = official_swin_to_visdet(official, prefix="")
    pm = PatchMerging(c, 2 * c)
    pm.load_state_dict({k.replace("stages.0.downsample.", ""): torch.from_numpy(v) for k, v in converted.items()})
    with torch.no_grad():
        got, hw = pm(torch.from_numpy(x.reshape(1, h * w, c)), (h, w))
    assert hw == (h // 2, w // 2)
    np.testing.assert_allclose(got.numpy().reshape(want.shape), want, rtol=1e-5, atol=1e-5)
