"""Hostile and damaged model configs end in one ConfigError line, quickly and in bounded memory (issue 19)."""
from __future__ import annotations

import resource
import time

import pytest

from flaxdet.config import PRESET_DIR, ConfigError, load_config

PRESET = (PRESET_DIR / "mask_rcnn_r50.yaml").read_text()


def _bomb(indent=""):
    """~0.4 KB of nested anchors: 9**9 (387 million) leaves once the aliases are expanded."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(indent + line for line in lines)


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("where", ["list_field", "scalar_field", "top_level"])
def test_yaml_alias_bomb_is_refused_before_expansion(tmp_path, where):
    if where == "list_field":  # under a field that takes anything (init_cfg)
        text = "type: MaskRCNN\nbackbone:\n  type: ResNet\n  init_cfg:\n" + _bomb("    ")
    elif where == "scalar_field":  # under a field that rejects lists: the error printed the whole value (1.4 GB)
        text = "type: MaskRCNN\nbackbone:\n  type: ResNet\n  style:\n" + _bomb("    ")
    else:
        text = _bomb() + "\ntype: MaskRCNN\n"
    assert len(text) < 1200
    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    before, t = _rss_mb(), time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert time.perf_counter() - t < 2 and _rss_mb() - before < 200
    assert "alias" in msg and str(p) in msg and len(msg) < 400 and "\n" not in msg


def test_recursive_alias_and_deep_nesting(tmp_path):
    p = tmp_path / "rec.yaml"
    p.write_text("type: MaskRCNN\nbackbone: &b\n  type: ResNet\n  init_cfg: *b\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(p)
    p.write_text("type: MaskRCNN\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        load_config(p)


def test_a_few_aliases_still_load(tmp_path):
    text = PRESET.replace("norm_cfg: {type: BN, requires_grad: true}", "norm_cfg: &bn {type: BN, requires_grad: true}")
    assert "&bn" in text
    p = tmp_path / "ok.yaml"
    p.write_text(text)
    assert load_config(p).backbone.norm_cfg.type == "BN"


def test_error_messages_truncate_big_values(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("type: MaskRCNN\nbackbone:\n  type: ResNet\n  style: [" + ", ".join(["verylongvalue"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "backbone.style" in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("old,new,match", [
    ("depth: 50", "depth: eighteen", r"'backbone.depth' in .* must be an integer, got 'eighteen'"),
    ("depth: 50", "depth: 19", r"depth must be 18, 34, 50, 101 or 152"),
    ("  out_channels: 256", '  out_channels: "32"', r"'neck.out_channels' in .* must be an integer, got '32'"),
    ("  out_channels: 256", "  out_channels: -32", r"'neck.out_channels' in .* must be >= 1, got -32"),
    ("depth: 50", "depth: 50\n  base_channels: 0", r"'backbone.base_channels' in .* must be >= 1, got 0"),
    ("norm_eval: true", "norm_eval: maybe", r"'backbone.norm_eval' .* must be true or false"),
    ("in_channels: [256, 512, 1024, 2048]", "in_channels: [256, x, 1024, 2048]",
     r"'neck.in_channels.1' in .* must be an integer"),
])
def test_value_type_and_range(tmp_path, old, new, match):
    assert old in PRESET
    p = tmp_path / "bad.yaml"
    p.write_text(PRESET.replace(old, new, 1))
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_binary_file_as_config(tmp_path):
    p = tmp_path / "model.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="binary file, not a YAML config"):
        load_config(p)
    p.write_bytes(b"type: MaskRCNN\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(p)
