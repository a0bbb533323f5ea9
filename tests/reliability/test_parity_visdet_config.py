"""`flaxdet parity --against visdet` hands visdet the user's config as written -- the YAML file (read by visdet's own
loader), visdet's own preset, or the model dict of a runner checkpoint's meta.cfg -- not flaxdet's dataclass dump
(which visdet rejects: ``MaskRCNN.__init__() got an unexpected keyword argument 'preset_meta'``, then
``ResNet.__init__() ... 'plugins'``). visdet is not installable here, so a stand-in package records what visdet
would be given; the real visdet run is recorded by hand in docs/parity-against-visdet.md (issue 19)."""
from __future__ import annotations

import sys
import types

import pytest
import yaml

import flaxdet.tools as tools
from flaxdet.config import PRESET_DIR, load_config, with_num_classes
from flaxdet_converters.checkpoint_io import Checkpoint


class FakeConfig(dict):
    """visdet.engine.config.Config, as far as flaxdet uses it."""

    @classmethod
    def fromfile(cls, path):
        return cls(yaml.safe_load(open(path)))

    def to_dict(self):
        return dict(self)


class Built(Exception):
    pass


@pytest.fixture
def fake_visdet(monkeypatch):
    built = {}
    presets = {"mask_rcnn_r50": yaml.safe_load((PRESET_DIR / "mask_rcnn_r50.yaml").read_text())}
    presets["mask_rcnn_r50"]["preset_meta"] = {"aliases": ["mrcnn"]}

    def build(cfg):
        built["cfg"] = cfg
        raise Built

    class Presets:
        def __contains__(self, name):
            return name in presets

        def get(self, name):
            return dict(presets[name])

        def list(self):
            return sorted(presets)

    registry = types.SimpleNamespace(MODEL_PRESETS=Presets())
    mods = {
        "visdet": types.ModuleType("visdet"),
        "visdet.models": types.ModuleType("visdet.models"),
        "visdet.engine": types.ModuleType("visdet.engine"),
        "visdet.engine.config": types.SimpleNamespace(Config=FakeConfig),
        "visdet.engine.model": types.ModuleType("visdet.engine.model"),
        "visdet.engine.model.utils": types.SimpleNamespace(revert_sync_batchnorm=lambda m: m),
        "visdet.engine.registry": types.SimpleNamespace(init_default_scope=lambda scope: None),
        "visdet.registry": types.SimpleNamespace(MODELS=types.SimpleNamespace(build=build)),
        "visdet.structures": types.SimpleNamespace(DetDataSample=dict),
        "visdet.presets": types.ModuleType("visdet.presets"),
        "visdet.presets.registry": registry,
    }
    mods["visdet"].models = mods["visdet.models"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return built


def _ck(model_cfg=None, sd=None):
    return Checkpoint(sd or {}, None, {}, model_cfg, "pth-runner", "epoch_1.pth")


def test_yaml_file_as_written(fake_visdet, tmp_path):
    text = (PRESET_DIR / "mask_rcnn_r50.yaml").read_text()
    p = tmp_path / "my_model.yaml"
    p.write_text("preset_meta:\n  aliases: [x]\n" + text)
    cfg = load_config(p)
    got, source = tools.visdet_model_config(str(p), _ck(), cfg)
    assert source == str(p)
    assert dict(got) == yaml.safe_load(text)  # as written: no preset_meta, none of flaxdet's dataclass defaults
    assert "plugins" not in got["backbone"]
    with pytest.raises(tools.CommandError, match="visdet cannot build the model"):
        tools._visdet_stages(got, cfg, {}, None, None)
    assert fake_visdet["cfg"] == got  # what visdet's MODELS.build was handed


def test_visdet_preset_by_name(fake_visdet):
    got, source = tools.visdet_model_config("mask_rcnn_r50", _ck(), load_config("mask_rcnn_r50"))
    assert source == "visdet preset mask_rcnn_r50" and "preset_meta" not in got
    with pytest.raises(tools.CommandError, match="visdet has no preset 'cascade_rcnn_r50'"):
        tools.visdet_model_config("cascade_rcnn_r50", _ck(), load_config("cascade_rcnn_r50"))


def test_runner_checkpoint_meta_cfg(fake_visdet):
    model = yaml.safe_load((PRESET_DIR / "mask_rcnn_r50.yaml").read_text())
    got, source = tools.visdet_model_config(None, _ck(model_cfg=model), load_config("mask_rcnn_r50"))
    assert dict(got) == model and source == "epoch_1.pth (meta.cfg)"


def test_rtmdet_num_classes_from_the_checkpoint(fake_visdet, tmp_path):
    """visdet's RTMDet presets leave num_classes out; flaxdet takes it from the checkpoint and says so."""
    import numpy as np

    p = tmp_path / "rtm.yaml"
    p.write_text((PRESET_DIR / "rtmdet_tiny.yaml").read_text())
    sd = {"bbox_head.rtm_cls.0.weight": np.zeros((7, 96, 1, 1), np.float32)}
    cfg = with_num_classes(load_config(p), sd, log=lambda *a: None)
    got, source = tools.visdet_model_config(str(p), _ck(sd=sd), cfg)
    assert got["bbox_head"]["num_classes"] == 7 and "num_classes 7 from the checkpoint" in source
