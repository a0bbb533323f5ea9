"""Config honesty: a field flaxdet parses but does not act on is a ConfigError naming its key path and the
file when set to anything but the value flaxdet implements (``flaxdet.config.UNHONOURED``) -- at parse time,
or for fields only training reads (``TRAIN_ONLY``) when training is set up (``check_trainable``, called by
``TrainState``), so such configs still predict; every shipped preset, visdet two-stage config and golden
config still parses and trains."""
from __future__ import annotations

import functools

import pytest
import yaml

from flaxdet.config import (
    PRESET_DIR,
    TRAIN_ONLY,
    UNHONOURED,
    ConfigError,
    ConvFCBBoxHeadCfg,
    Shared2FCBBoxHeadCfg,
    check_trainable,
    is_two_stage,
    list_presets,
    load_config,
)
from parity_tests.goldens import GOLDENS

VISDET_MODELS = GOLDENS.parent / "visdet-configs" / "models"

# (preset, key path in the YAML (list items by index), a value flaxdet does not honour); the error names the
# path, or its parent for the keys of a whole loss config (``.use_sigmoid`` ...).
CASES = [
    ("mask_rcnn_r50", "backbone.with_cp", True),
    ("mask_rcnn_r50", "backbone.norm_eval", False),
    ("mask_rcnn_r50", "backbone.conv_cfg", {"type": "ConvWS"}),
    ("mask_rcnn_swin_s", "backbone.with_cp", True),
    ("mask_rcnn_swin_s", "backbone.attn_backend", "flash"),
    ("mask_rcnn_swin_s", "backbone.norm_cfg", {"type": "LN", "requires_grad": False}),
    ("mask_rcnn_r50", "neck.conv_cfg", {"type": "ConvWS"}),
    ("mask_rcnn_r50", "neck.norm_cfg", {"type": "BN", "requires_grad": True}),
    ("mask_rcnn_r50", "rpn_head.reg_decoded_bbox", True),
    ("mask_rcnn_r50", "rpn_head.loss_cls.use_sigmoid", False),
    ("mask_rcnn_r50", "rpn_head.loss_cls.reduction", "sum"),
    ("mask_rcnn_r50", "roi_head.bbox_head.conv_cfg", {"type": "ConvWS"}),
    ("mask_rcnn_r50", "roi_head.bbox_head.norm_cfg", {"type": "GN", "num_groups": 32, "requires_grad": False}),
    ("mask_rcnn_r50", "roi_head.bbox_head.reg_decoded_bbox", True),
    ("mask_rcnn_r50", "roi_head.bbox_head.loss_cls.use_mask", True),
    ("mask_rcnn_r50", "roi_head.bbox_head.loss_cls.class_weight", [1.0] * 81),
    ("mask_rcnn_r50", "roi_head.bbox_head.loss_cls.ignore_index", 80),
    ("mask_rcnn_r50", "roi_head.bbox_head.loss_bbox.reduction", "none"),
    ("mask_rcnn_r50", "roi_head.bbox_head.reg_predictor_cfg", {"type": "NormedLinear"}),
    ("mask_rcnn_r50", "roi_head.bbox_head.cls_predictor_cfg", {"type": "NormedLinear", "temperature": 20}),
    ("mask_rcnn_r50", "roi_head.bbox_head.predict_box_type", "rbox"),
    ("mask_rcnn_r50", "roi_head.mask_head.conv_cfg", {"type": "ConvWS"}),
    ("mask_rcnn_r50", "roi_head.mask_head.norm_cfg", {"type": "BN"}),
    ("mask_rcnn_r50", "roi_head.mask_head.predictor_cfg", {"type": "NormedConv2d"}),
    ("mask_rcnn_r50", "roi_head.mask_head.loss_mask.use_mask", False),
    ("mask_rcnn_r50", "train_cfg.rcnn.assigner.neg_iou_thr", [0.1, 0.5]),
    ("mask_rcnn_r50", "train_cfg.rpn.assigner.ignore_iof_thr", 0.5),
    ("mask_rcnn_r50", "train_cfg.rpn.assigner.gpu_assign_thr", 100),
    ("mask_rcnn_r50", "train_cfg.rcnn.assigner.iou_calculator", {"type": "BboxOverlaps2D", "dtype": "fp16"}),
    ("mask_rcnn_r50", "train_cfg.rpn.sampler.add_gt_as_proposals", True),
    ("mask_rcnn_r50", "test_cfg.rcnn.nms.type", "soft_nms"),
    ("mask_rcnn_r50", "test_cfg.rpn.nms.class_agnostic", True),
    ("mask_rcnn_r50", "data_preprocessor.pad_size_divisor", 64),
    ("mask_rcnn_r50", "data_preprocessor.mask_pad_value", 255),
    ("mask_rcnn_r50", "data_preprocessor.batch_augments", [{"type": "BatchFixedSizePad", "size": [1024, 1024]}]),
    ("mask_rcnn_r50", "data_preprocessor.pad_mask", False),
    ("cascade_rcnn_r50", "rpn_head.loss_bbox.reduction", "sum"),  # SmoothL1Loss
    ("cascade_rcnn_r50", "roi_head.bbox_head.2.reg_decoded_bbox", True),
    ("cascade_rcnn_r50", "train_cfg.rcnn.1.assigner.neg_iou_thr", [0.0, 0.6]),
    ("rtmdet_s", "backbone.conv_cfg", {"type": "ConvWS"}),
    ("rtmdet_s", "neck.conv_cfg", {"type": "ConvWS"}),
    ("rtmdet_ins_s", "bbox_head.conv_cfg", {"type": "ConvWS"}),
    ("rtmdet_s", "backbone.act_cfg", {"type": "GELU"}),
    ("rtmdet_s", "neck.act_cfg", {"type": "HSwish"}),
    ("rtmdet_ins_s", "bbox_head.act_cfg", {"type": "GELU"}),
]


# the CASES whose field only training reads: they load, and check_trainable refuses them
TRAINING_CASES = {"backbone.with_cp", "backbone.norm_eval", "backbone.norm_cfg", "neck.norm_cfg",
                  "rpn_head.reg_decoded_bbox", "rpn_head.loss_cls.use_sigmoid", "rpn_head.loss_cls.reduction",
                  "roi_head.bbox_head.norm_cfg", "roi_head.bbox_head.reg_decoded_bbox",
                  "roi_head.bbox_head.loss_cls.class_weight", "roi_head.bbox_head.loss_cls.ignore_index",
                  "roi_head.bbox_head.loss_bbox.reduction", "roi_head.mask_head.norm_cfg",
                  "roi_head.mask_head.loss_mask.use_mask", "train_cfg.rcnn.assigner.neg_iou_thr",
                  "train_cfg.rpn.assigner.ignore_iof_thr", "train_cfg.rpn.assigner.gpu_assign_thr",
                  "train_cfg.rcnn.assigner.iou_calculator", "train_cfg.rpn.sampler.add_gt_as_proposals",
                  "data_preprocessor.pad_size_divisor", "data_preprocessor.mask_pad_value",
                  "data_preprocessor.batch_augments", "data_preprocessor.pad_mask", "rpn_head.loss_bbox.reduction",
                  "roi_head.bbox_head.2.reg_decoded_bbox", "train_cfg.rcnn.1.assigner.neg_iou_thr"}


def _error_key(path):
    head, last = path.rsplit(".", 1)
    return head if last in ("use_sigmoid", "use_mask") else path


def _preset_with(tmp_path, preset, path, value):
    d = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[int(last) if isinstance(node, list) else last] = value
    p = tmp_path / f"{preset}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("preset,path,value", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_unhonoured_value_names_key_and_file(tmp_path, preset, path, value):
    p = _preset_with(tmp_path, preset, path, value)
    with pytest.raises(ConfigError) as e:
        cfg = load_config(p)
        assert path in TRAINING_CASES, f"{path} should be refused when the config is read"
        check_trainable(cfg, str(p))
    msg = str(e.value)
    assert f"'{_error_key(path)}' in {p}: flaxdet does not honour this field" in msg, msg


def test_message_says_what_visdet_does_and_what_to_set(tmp_path):
    p = _preset_with(tmp_path, "mask_rcnn_r50", "roi_head.bbox_head.loss_cls.class_weight", [2.0] * 81)
    cfg = load_config(p)  # a loss weight changes training only: the config still predicts
    with pytest.raises(ConfigError, match=r"class_weight' in .*\(visdet: per-class CE weights\); set it to None"):
        check_trainable(cfg, str(p))


def test_training_cases_are_the_train_only_entries():
    for owner, rel, _, _ in UNHONOURED:
        cases = {path in TRAINING_CASES for _, path, _ in CASES if _error_key(path).endswith(rel)}
        if rel == "loss_cls":  # the RPN's (training only) and the bbox head's (refused at parse)
            continue
        assert cases == {(owner, rel) in TRAIN_ONLY}, (owner.__name__, rel, cases)


def test_every_table_entry_is_exercised():
    for owner, rel, _, _ in UNHONOURED:
        assert any(_error_key(path).endswith(rel) for _, path, _ in CASES), (owner.__name__, rel)


def test_defaults_are_honoured():
    """Leaving a key out never raises: every entry accepts its dataclass default (``pad_mask`` is the one whose
    acceptance depends on the model -- false is visdet's default and is refused for models with masks)."""
    for owner, rel, (ok, _), _ in UNHONOURED:
        cfg = (Shared2FCBBoxHeadCfg if owner is ConvFCBBoxHeadCfg else owner)()
        assert ok(functools.reduce(getattr, rel.split("."), cfg), cfg), (owner.__name__, rel)


@pytest.mark.parametrize("preset,path,value", [
    ("faster_rcnn_r50", "data_preprocessor.pad_mask", False),  # no masks: padding them means nothing
    ("mask_rcnn_r50", "backbone.conv_cfg", {"type": "Conv2d"}),
    ("mask_rcnn_r50", "neck.norm_cfg", {"type": "GN", "num_groups": 32}),
    ("mask_rcnn_r50", "roi_head.bbox_head.loss_cls.ignore_index", -100),
    ("mask_rcnn_r50", "roi_head.bbox_head.reg_predictor_cfg", {"type": "Linear"}),
    ("mask_rcnn_r50", "train_cfg.rpn.assigner.ignore_iof_thr", 0),
    ("mask_rcnn_r50", "train_cfg.rcnn.assigner.iou_calculator", {"type": "BboxOverlaps2D"}),
    ("mask_rcnn_r50", "test_cfg.rcnn.nms.split_thr", 2000),  # the same NMS either way
])
def test_equivalent_values_are_accepted(tmp_path, preset, path, value):
    load_config(_preset_with(tmp_path, preset, path, value))


def shipped_configs():
    paths = [PRESET_DIR / f"{name}.yaml" for name in list_presets()]
    paths += sorted(p for pat in ("mask_rcnn_*", "faster_rcnn_*", "cascade_*") for p in VISDET_MODELS.glob(pat))
    return paths + sorted(GOLDENS.glob("*/config.yaml")) + sorted(GOLDENS.glob("*/model.yaml"))


@pytest.mark.parametrize("path", shipped_configs(), ids=str)
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    if is_two_stage(cfg):  # the family flaxdet trains
        check_trainable(cfg, str(path))
