"""Config layer: every preset and golden config parses; unknown types/keys are errors naming key and file."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from flaxdet.config import (
    TYPE_TABLE,
    ConfigError,
    FasterRCNNCfg,
    FrozenMap,
    MaskRCNNCfg,
    Shared2FCBBoxHeadCfg,
    list_presets,
    load_config,
    parse_model_config,
    to_dict,
)
from parity_tests.goldens import GOLDENS, require_goldens


def golden_configs():
    return sorted(GOLDENS.glob("*/config.yaml")) + sorted(GOLDENS.glob("*/model.yaml"))


def test_presets_listed_and_parse():
    assert {"mask_rcnn_r50", "faster_rcnn_r50"} <= set(list_presets())
    m = load_config("mask_rcnn_r50")
    assert isinstance(m, MaskRCNNCfg)
    assert m.backbone.depth == 50 and m.backbone.frozen_stages == 1 and m.backbone.norm_eval
    assert m.neck.in_channels == (256, 512, 1024, 2048)
    assert m.roi_head.bbox_head.num_classes == 80
    assert isinstance(m.roi_head.bbox_head, Shared2FCBBoxHeadCfg)
    assert m.roi_head.bbox_head.bbox_coder.target_stds == (0.1, 0.1, 0.2, 0.2)
    # TwoStageDetector semantics: rpn num_classes forced to 1, train/test cfgs handed down
    assert m.rpn_head.num_classes == 1
    assert m.rpn_head.test_cfg.nms_pre == 1000 and m.rpn_head.train_cfg.sampler.num == 256
    assert m.roi_head.test_cfg.mask_thr_binary == 0.5 and m.roi_head.train_cfg.mask_size == 28
    assert m.train_cfg.rpn_proposal.nms_pre == 2000
    f = load_config("faster_rcnn_r50")
    assert isinstance(f, FasterRCNNCfg) and f.roi_head.mask_head is None


@pytest.mark.parametrize("name", ["mask_rcnn_r50", "faster_rcnn_r50"])
def test_round_trip_through_visdet_schema(name, tmp_path):
    cfg = load_config(name)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(p) == cfg
    hash(cfg)  # frozen and hashable: usable as a jit static argument
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backbone.depth = 101


@pytest.mark.goldens
def test_every_golden_config_parses():
    require_goldens()
    paths = golden_configs()
    assert len(paths) >= 4
    for p in paths:
        cfg = load_config(p)
        assert cfg.TYPE == "MaskRCNN", p


@pytest.mark.goldens
def test_golden_values():
    require_goldens()
    c = load_config(GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml")
    assert (c.backbone.depth, c.backbone.base_channels) == (18, 16)
    assert c.roi_head.bbox_head.fc_out_channels == 64 and c.roi_head.mask_head.num_classes == 5
    assert c.backbone.init_cfg is None and c.backbone.norm_cfg.requires_grad


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.goldens
def test_unknown_type_names_key_and_file(tmp_path):
    require_goldens()
    text = (GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml").read_text()
    p = _write(tmp_path, text.replace("type: FPN", "type: PAFPN"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "PAFPN" in str(e.value) and "neck.type" in str(e.value) and str(p) in str(e.value)


def test_unknown_key_names_key_and_file(tmp_path):
    d = to_dict(load_config("mask_rcnn_r50"))
    d["roi_head"]["bbox_head"]["fc_out_channel"] = 12  # typo
    p = _write(tmp_path, yaml.safe_dump(d))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "roi_head.bbox_head.fc_out_channel" in msg and str(p) in msg


def test_type_in_wrong_place(tmp_path):
    d = to_dict(load_config("mask_rcnn_r50"))
    d["neck"]["type"] = "ResNet"
    with pytest.raises(ConfigError, match="not allowed at 'neck'"):
        parse_model_config(d, "x.yaml")


def test_missing_type_and_bad_files(tmp_path):
    d = to_dict(load_config("mask_rcnn_r50"))
    del d["backbone"]["type"]
    with pytest.raises(ConfigError, match="needs a 'type'"):
        parse_model_config(d, "x.yaml")
    with pytest.raises(ConfigError, match="neither a config file nor a preset"):
        load_config("no_such_preset")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_type_table_is_explicit():
    for name, cls in TYPE_TABLE.items():
        assert cls.TYPE == name
    assert FrozenMap({"a": [1, {"b": 2}]}) == {"a": (1, {"b": 2})}
