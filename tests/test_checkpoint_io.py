"""Checkpoint I/O on real files: three formats, visdet's runner checkpoint, DDP, and bad inputs."""
from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml

from flaxdet_converters.checkpoint_io import (CheckpointError, load_checkpoint, parse_python_config,
                                              save_checkpoint)
from parity_tests.goldens import GOLDENS, require_goldens

CASES = ("mask_rcnn_tiny_r18", "mask_rcnn_tiny_r50", "mask_rcnn_tiny_swin")


@pytest.mark.parametrize("case", CASES)
def test_three_formats_agree_with_torch(case):
    require_goldens()
    d = GOLDENS / case
    ref = torch.load(d / "state_dict.pth", weights_only=True)
    raw, run, st = (load_checkpoint(d / f) for f in ("state_dict.pth", "checkpoint.pth", "model.safetensors"))
    assert (raw.source_format, run.source_format, st.source_format) == ("pth-state-dict", "pth-runner", "safetensors")
    assert list(raw.state_dict) == list(ref) == list(run.state_dict)
    assert sorted(st.state_dict) == sorted(ref)
    for k, t in ref.items():
        want = t.numpy()
        for ck in (raw, run, st):
            got = ck.state_dict[k]
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), k
    ints = {k: v for k, v in raw.state_dict.items() if v.dtype == np.int64}
    assert ints, "num_batches_tracked / relative_position_index must stay int64"
    if case != "mask_rcnn_tiny_swin":
        assert raw.state_dict["backbone.bn1.num_batches_tracked"].shape == ()
    meta = torch.load(d / "checkpoint.pth", weights_only=True)["meta"]
    assert run.classes == list(meta["dataset_meta"]["classes"])


def test_visdet_runner_checkpoint_loads_safely():
    require_goldens()
    p = GOLDENS / "runner_tiny_r18" / "epoch_1.pth"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(p, weights_only=True)  # why we need our own reader: visdet classes inside
    ck = load_checkpoint(p)
    assert ck.classes == ["box", "disc"]
    want = yaml.safe_load((GOLDENS / "runner_tiny_r18" / "model.yaml").read_text())
    assert json.loads(json.dumps(ck.model_cfg)) == json.loads(json.dumps(want))
    assert ck.state_dict["roi_head.bbox_head.fc_cls.weight"].shape[0] == 3
    assert "opaque" in json.dumps(ck.meta, default=str) or ck.meta["dataset_meta"]["classes"] == ["box", "disc"]


def test_ddp_prefix_stripped(tmp_path):
    p = tmp_path / "ddp.pth"
    torch.save({"state_dict": OrderedDict([("module.a.weight", torch.ones(2)), ("module.b", torch.zeros(()))])}, p)
    assert list(load_checkpoint(p).state_dict) == ["a.weight", "b"]


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_SENTINEL', '/nonexistent/x')}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch, zip_format):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_SENTINEL", str(sentinel))
    p = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, p, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="not a (readable )?checkpoint"):
        load_checkpoint(p)
    assert not sentinel.exists()


def test_bad_inputs(tmp_path):
    require_goldens()
    good = GOLDENS / "mask_rcnn_tiny_r18" / "state_dict.pth"
    cases = {}
    cases["missing"] = (tmp_path / "nope.pth", "not found")
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.pth", "empty file")
    (tmp_path / "trunc.pth").write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.6)])
    cases["trunc"] = (tmp_path / "trunc.pth", "truncated or corrupt")
    st = GOLDENS / "mask_rcnn_tiny_r18" / "model.safetensors"
    (tmp_path / "trunc.safetensors").write_bytes(st.read_bytes()[: int(st.stat().st_size * 0.6)])
    cases["trunc_st"] = (tmp_path / "trunc.safetensors", "truncated or corrupt")
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint")
    cases["text"] = (tmp_path / "notes.txt", "not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases["list"] = (tmp_path / "list.pth", "top-level object is list")
    torch.save({"a": 1}, tmp_path / "dict.pth")
    cases["dict"] = (tmp_path / "dict.pth", "no 'state_dict' and no tensors")
    for name, (path, msg) in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert msg in str(e.value) and str(path.name) in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_save_round_trip_and_atomicity(tmp_path, ext):
    sd = OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), n=np.array(7, np.int64),
                     h=np.ones(2, np.float16))
    p = tmp_path / f"m.{ext}"
    save_checkpoint(p, sd, classes=["x", "y"])
    ck = load_checkpoint(p)
    assert ck.classes == ["x", "y"]
    for k, v in sd.items():
        assert ck.state_dict[k].dtype == v.dtype and np.array_equal(ck.state_dict[k], v)
    before = p.read_bytes()
    with pytest.raises(CheckpointError):
        save_checkpoint(p, {"bad": np.array([object()], dtype=object)})
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == [p.name]
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        save_checkpoint(tmp_path / "m.bin", sd)


def test_parse_python_config():
    require_goldens()
    cfg = parse_python_config((GOLDENS / "runner_tiny_r18" / "runner_config.py").read_text(), strict=False)
    want = yaml.safe_load((GOLDENS / "runner_tiny_r18" / "model.yaml").read_text())
    assert json.loads(json.dumps(cfg["model"])) == json.loads(json.dumps(want))
    with pytest.raises(CheckpointError, match="line 1"):
        parse_python_config("import os\nmodel = dict(a=1)\n")
    with pytest.raises(CheckpointError, match="line 2"):
        parse_python_config("a = 1\nx = os.system('echo hi')\n")
    assert parse_python_config("a = dict(b=[1, -2.5, (3,)], c=None)\nimport os\n", strict=False) == \
        {"a": {"b": [1, -2.5, (3,)], "c": None}}
