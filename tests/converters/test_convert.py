"""Converter: rule-based key accounting, bit-identical round trip, clear errors that write nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

from flaxdet.config import load_config
from flaxdet.models import build_detector
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import ConversionError, export_visdet_state_dict, flax_variables, load_visdet_state_dict
from parity_tests.goldens import CASES, GOLDENS, WEIGHT_FILES, require_goldens


def cfg_of(case):
    require_goldens()
    return load_config(GOLDENS / case / "config.yaml")


@pytest.mark.goldens
@pytest.mark.parametrize("fname", WEIGHT_FILES)
@pytest.mark.parametrize("case", CASES)
def test_round_trip_bit_identical(case, fname):
    sd = load_checkpoint(GOLDENS / case / fname).state_dict
    model = build_detector(cfg_of(case))
    report = load_visdet_state_dict(model, sd)
    assert report.ok and sorted(report.converted) == sorted(sd)
    back = export_visdet_state_dict(model, key_order=list(sd))
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert np.array_equal(back[k], sd[k]), k


@pytest.mark.goldens
def test_paths_are_visdet_keys():
    """A visdet key names its Flax variable by path: no table, no positions."""
    model = build_detector(cfg_of("mask_rcnn_tiny_r18"))
    keys = {k: owner for k, _, owner in flax_variables(model)}
    assert type(keys["roi_head.bbox_head.shared_fcs.0.weight"]).__name__ == "Linear"
    assert type(keys["roi_head.mask_head.convs.2.conv.weight"]).__name__ == "Conv2d"
    assert type(keys["roi_head.mask_head.upsample.weight"]).__name__ == "ConvTranspose2d"
    assert type(keys["backbone.layer2.0.downsample.1.running_var"]).__name__ == "BatchNorm2d"
    w = model.roi_head.bbox_head.shared_fcs[0].weight.get_value()
    assert w.shape == (32 * 7 * 7, 64)  # (in, out): torch (out, in) transposed


def _sd(case="mask_rcnn_tiny_r18"):
    require_goldens()
    return OrderedDict(load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict)


@pytest.mark.goldens
def test_missing_unexpected_misshapen_are_reported_and_nothing_changes():
    sd = _sd()
    sd.pop("neck.fpn_convs.0.conv.bias")
    sd["roi_head.extra.weight"] = np.zeros(3, np.float32)
    sd["rpn_head.rpn_cls.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    model = build_detector(cfg_of("mask_rcnn_tiny_r18"))
    before = {k: np.asarray(v.get_value()).copy() for k, v, _ in flax_variables(model)}
    with pytest.raises(ConversionError) as e:
        load_visdet_state_dict(model, sd)
    msg = str(e.value)
    assert "missing (1): neck.fpn_convs.0.conv.bias" in msg
    assert "unexpected (1): roi_head.extra.weight" in msg
    assert "rpn_head.rpn_cls.weight: checkpoint (4, 32, 1, 1) vs model (3, 32, 1, 1)" in msg
    after = {k: np.asarray(v.get_value()) for k, v, _ in flax_variables(model)}
    assert all(np.array_equal(before[k], after[k]) for k in before), "strict failure must not modify the model"
    rep = load_visdet_state_dict(model, sd, strict=False)
    assert len(rep.missing) == 1 and len(rep.unexpected) == 1 and len(rep.misshapen) == 1
    assert len(rep.converted) == len(sd) - 2


@pytest.mark.goldens
def test_wrong_architecture():
    sd = _sd("mask_rcnn_tiny_r18")
    model = build_detector(cfg_of("mask_rcnn_tiny_r50"))
    with pytest.raises(ConversionError, match="wrong architecture"):
        load_visdet_state_dict(model, sd)


def test_mmdet_dialect_renames_swin_projection():
    from flaxdet_converters.convert import ConversionReport, _normalise_keys

    rep = ConversionReport()
    out = _normalise_keys({"backbone.patch_embed.projection.weight": 1, "neck.x": 2}, "mmdet", rep)
    assert list(out) == ["backbone.patch_embed.proj.weight", "neck.x"]
    assert rep.renamed == ["backbone.patch_embed.projection.weight -> backbone.patch_embed.proj.weight"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flaxdet.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.goldens
@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_cli_convert_export_round_trip(tmp_path, fmt):
    require_goldens()
    src = GOLDENS / "mask_rcnn_tiny_r18" / "checkpoint.pth"
    r = _cli("convert", src, "--config", GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml", "--out", tmp_path / "m",
             "--format", fmt)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["classes"] == load_checkpoint(src).classes and meta["format"] == fmt
    assert (tmp_path / "m" / "config.yaml").is_file()
    for ext in ("pth", "safetensors"):
        out = tmp_path / f"back.{ext}"
        r = _cli("export", tmp_path / "m", "--out", out)
        assert r.returncode == 0, r.stderr
        back = load_checkpoint(out)
        orig = load_checkpoint(src)
        assert list(back.state_dict) == list(orig.state_dict)
        assert all(np.array_equal(back.state_dict[k], orig.state_dict[k])
                   and back.state_dict[k].dtype == orig.state_dict[k].dtype for k in orig.state_dict)
        if ext == "pth":
            assert back.classes == orig.classes


@pytest.mark.goldens
def test_cli_convert_runner_checkpoint_without_config(tmp_path):
    """visdet's own runner file: config recovered from meta.cfg, no visdet, nothing executed."""
    require_goldens()
    r = _cli("convert", GOLDENS / "runner_tiny_r18" / "epoch_1.pth", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["classes"] == ["box", "disc"]
    assert load_config(tmp_path / "m" / "config.yaml").roi_head.bbox_head.num_classes == 2


@pytest.mark.goldens
def test_cli_errors_write_nothing(tmp_path):
    require_goldens()
    good = GOLDENS / "mask_rcnn_tiny_r18" / "state_dict.pth"
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = _cli("convert", trunc, "--config", GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml", "--out", tmp_path / "a")
    assert r.returncode == 2 and "error" in r.stderr and not (tmp_path / "a").exists()
    r = _cli("convert", good, "--config", GOLDENS / "mask_rcnn_tiny_r50" / "config.yaml", "--out", tmp_path / "b")
    assert r.returncode == 2 and "missing" in r.stderr and not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # an existing model directory survives a failed overwrite
    r = _cli("convert", good, "--config", GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml", "--out", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    before = sorted(p.name for p in (tmp_path / "c").rglob("*"))
    r = _cli("convert", trunc, "--config", GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml", "--out", tmp_path / "c",
             "--overwrite")
    assert r.returncode == 2 and sorted(p.name for p in (tmp_path / "c").rglob("*")) == before
    r = _cli("convert", good, "--config", "no_such_preset", "--out", tmp_path / "d")
    assert r.returncode == 2 and "neither a config file nor a preset" in r.stderr
