"""RTMDet configs: visdet's preset files as they ship (``_base_`` chains merged like visdet's loader), our ten
presets, ``num_classes`` from the checkpoint or ``--num-classes``, and one clear error for each bad input."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from flaxdet.config import (
    ConfigError,
    RTMDetCfg,
    RTMDetInsSepBNHeadCfg,
    check_trainable,
    list_presets,
    load_config,
    read_yaml_with_bases,
    test_scale,
    with_num_classes,
)
from flaxdet.tools import _config_for
from parity_tests.goldens import GOLDENS

VISDET = GOLDENS.parent / "visdet-configs" / "models"
NAMES = [f"rtmdet_{ins}{size}" for ins in ("", "ins_") for size in ("tiny", "s", "m", "l", "x")]
# visdet-rtmdet.md §1.1: deepen/widen, neck width and blocks, exp_on_reg (Ins heads: relu regression)
TABLE = {"tiny": (0.167, 0.375, 96, 1, False), "s": (0.33, 0.5, 128, 1, False), "m": (0.67, 0.75, 192, 2, True),
         "l": (1.0, 1.0, 256, 3, True), "x": (1.33, 1.25, 320, 4, True)}


@pytest.mark.goldens
@pytest.mark.parametrize("name", NAMES)
def test_visdet_presets_read_as_shipped_and_ours_equal_them(name):
    theirs = load_config(VISDET / f"{name}.yaml")
    assert isinstance(theirs, RTMDetCfg) and theirs == load_config(name)  # flaxdet/presets: the chain merged
    d, w, width, blocks, exp = TABLE[name.rsplit("_", 1)[1]]
    assert (theirs.backbone.deepen_factor, theirs.backbone.widen_factor) == (d, w)
    assert theirs.neck.out_channels == theirs.bbox_head.in_channels == theirs.bbox_head.feat_channels == width
    assert theirs.neck.num_csp_blocks == blocks
    ins = isinstance(theirs.bbox_head, RTMDetInsSepBNHeadCfg)
    assert ("ins_" in name) == ins and (ins or theirs.bbox_head.exp_on_reg == exp)
    assert theirs.bbox_head.num_classes is None  # visdet's presets leave it out
    assert theirs.bbox_head.test_cfg == theirs.test_cfg  # handed to the head, as visdet's SingleStageDetector does
    assert test_scale(theirs) == (640, 640) and theirs.backbone.norm_cfg.eps == 1e-5
    assert name in list_presets()


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_base_chain_merges_like_visdet(tmp_path):
    _write(tmp_path, "grand.yaml", {"a": {"x": 1, "y": [1, 2], "z": {"deep": 1}}, "b": 1})
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "sub/parent.yaml", {"_base_": "../grand.yaml", "a": {"y": [3], "z": {"other": 2}}})
    child = _write(tmp_path, "child.yaml", {"_base_": "./sub/parent.yaml", "a": {"x": 9}, "c": 3})
    merged = read_yaml_with_bases(child)
    # the child wins, dicts merge key by key, lists are replaced whole, paths are relative to each file
    assert merged == {"a": {"x": 9, "y": [3], "z": {"deep": 1, "other": 2}}, "b": 1, "c": 3}


def test_base_chain_errors(tmp_path):
    a = _write(tmp_path, "a.yaml", {"_base_": "b.yaml", "type": "RTMDet"})
    _write(tmp_path, "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match=r"_base_ chain loops: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(a)
    missing = _write(tmp_path, "m.yaml", {"_base_": "./nowhere.yaml"})
    with pytest.raises(ConfigError, match=r"m\.yaml: _base_ file not found: \./nowhere\.yaml"):
        load_config(missing)
    bad = _write(tmp_path, "bad.yaml", {"_base_": 3})
    with pytest.raises(ConfigError, match="_base_ must be a file path"):
        load_config(bad)


def _ckpt(sd, path="ckpt.pth"):
    return SimpleNamespace(state_dict=sd, path=path, model_cfg=None)


def test_num_classes_from_checkpoint_or_flag():
    cls_w = np.zeros((80, 96, 1, 1), np.float32)
    logs = []
    cfg = _config_for(_ckpt({"bbox_head.rtm_cls.0.weight": cls_w}), "rtmdet_tiny", log=logs.append)
    assert cfg.bbox_head.num_classes == 80 and "from the checkpoint" in logs[-1]
    cfg = _config_for(_ckpt({}), "rtmdet_tiny", num_classes=3, log=logs.append)
    assert cfg.bbox_head.num_classes == 3 and "--num-classes" in logs[-1]
    with pytest.raises(ConfigError, match="--num-classes is 3 but ckpt.pth has 80 classes"):
        _config_for(_ckpt({"bbox_head.rtm_cls.0.weight": cls_w}), "rtmdet_tiny", num_classes=3)
    with pytest.raises(ConfigError, match="num_classes is not set.*--num-classes"):
        with_num_classes(load_config("rtmdet_s"))
    fixed = load_config("rtmdet_s")
    fixed = dataclasses.replace(fixed, bbox_head=dataclasses.replace(fixed.bbox_head, num_classes=5))
    with pytest.raises(ConfigError, match="the config's bbox_head.num_classes is 5 but"):
        with_num_classes(fixed, {"bbox_head.rtm_cls.0.weight": cls_w})
    with pytest.raises(ConfigError, match="--num-classes applies to RTMDet"):
        with_num_classes(load_config("mask_rcnn_r50"), num_classes=3)


def test_family_mismatch_is_one_clear_error():
    rtm = _ckpt({"bbox_head.rtm_cls.0.weight": np.zeros((80, 96, 1, 1))})
    with pytest.raises(ConfigError, match="is an RTMDet checkpoint .* config is a two-stage MaskRCNN"):
        _config_for(rtm, "mask_rcnn_r50")
    two = _ckpt({"rpn_head.rpn_conv.weight": np.zeros((1,)), "roi_head.bbox_head.fc_cls.weight": np.zeros((1,))})
    with pytest.raises(ConfigError, match="is a two-stage checkpoint .* config is RTMDet"):
        _config_for(two, "rtmdet_s")


def test_rtmdet_trainable_and_what_training_refuses():
    """RTMDet / RTMDet-Ins presets train; a loss, assigner or allowed_border training does not implement is one
    error naming the field."""
    check_trainable(load_config("rtmdet_tiny"))
    ins = load_config("rtmdet_ins_tiny")
    check_trainable(ins)
    bad = dataclasses.replace(ins, bbox_head=dataclasses.replace(
        ins.bbox_head, loss_mask=dataclasses.replace(ins.bbox_head.loss_mask, naive_dice=True)))
    with pytest.raises(ConfigError, match="'bbox_head.loss_mask' in .*naive_dice: false"):
        check_trainable(bad)
    tc = load_config("rtmdet_tiny").train_cfg
    bad = dataclasses.replace(load_config("rtmdet_tiny"), train_cfg=dataclasses.replace(tc, allowed_border=0))
    with pytest.raises(ConfigError, match="'train_cfg.allowed_border'.*set it to -1"):
        check_trainable(bad)
