"""Checkpoint I/O on real files: three formats, visdet's runner checkpoint, DDP, hostile and broken inputs,
atomic saving, and the ast-only config parser. No mocks: every file is a golden or written by torch.save."""
from __future__ import annotations

import json
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml

from flaxdet_converters.checkpoint_io import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    parse_python_config,
    save_checkpoint,
)
from parity_tests.goldens import GOLDENS, require_goldens

CASES = ("mask_rcnn_tiny_r18", "mask_rcnn_tiny_r50", "mask_rcnn_tiny_swin")
RUNNER = GOLDENS / "runner_tiny_r18"


def _plain(x):  # tuples -> lists, for comparing parsed Python configs with YAML
    return json.loads(json.dumps(x))


# ----------------------------------------------------------------------------------------- golden files
@pytest.mark.goldens
@pytest.mark.parametrize("case", CASES)
def test_three_formats_agree_with_torch(case):
    require_goldens()
    d = GOLDENS / case
    raw, run, st = (load_checkpoint(d / f) for f in ("state_dict.pth", "checkpoint.pth", "model.safetensors"))
    assert isinstance(raw, Checkpoint)
    assert (raw.source_format, run.source_format, st.source_format) == ("pth-state-dict", "pth-runner", "safetensors")
    ref = torch.load(d / "state_dict.pth", weights_only=True)
    ref_run = torch.load(d / "checkpoint.pth", weights_only=True)
    assert list(raw.state_dict) == list(ref) == list(run.state_dict) == list(ref_run["state_dict"])
    assert sorted(st.state_dict) == sorted(ref)
    for k, t in ref.items():
        want = t.numpy()
        for ck, src in ((raw, ref[k]), (run, ref_run["state_dict"][k]), (st, ref[k])):
            got = ck.state_dict[k]
            assert got.dtype == want.dtype and got.shape == want.shape, (k, ck.source_format)
            assert got.tobytes() == want.tobytes() == src.numpy().tobytes(), (k, ck.source_format)  # bit-identical
            assert got.flags.c_contiguous, k
    ints = {k for k, v in raw.state_dict.items() if v.dtype != np.float32}
    if case == "mask_rcnn_tiny_swin":  # no BatchNorm; window attention's index buffers
        assert ints == {k for k in raw.state_dict if k.endswith("relative_position_index")} and ints
        assert all(st.state_dict[k].dtype == np.int64 and st.state_dict[k].shape == (49, 49) for k in ints)
    else:
        assert ints == {k for k in raw.state_dict if k.endswith("num_batches_tracked")} and ints
        assert all(ck.state_dict[k].dtype == np.int64 and ck.state_dict[k].shape == () for k in ints
                   for ck in (raw, run, st))
    assert run.classes == list(ref_run["meta"]["dataset_meta"]["classes"]) and run.classes
    assert raw.classes is None and raw.meta == {} and raw.model_cfg is None and run.warnings == []


@pytest.mark.goldens
def test_visdet_runner_checkpoint_loads_safely():
    require_goldens()
    p = RUNNER / "epoch_1.pth"
    # Why we need our own reader: visdet objects (HistoryBuffer, numpy scalars) in message_hub.
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        torch.load(p, weights_only=True)
    ck = load_checkpoint(p)
    assert ck.source_format == "pth-runner" and ck.classes == ["box", "disc"] and ck.warnings == []
    assert _plain(ck.model_cfg) == _plain(yaml.safe_load((RUNNER / "model.yaml").read_text()))
    json.dumps(ck.meta)  # plain data
    assert ck.meta["dataset_meta"]["classes"] == ["box", "disc"] and ck.meta["cfg"].startswith("default_hooks")
    # Same architecture as the r18 golden but 2 classes: same keys in the same order, class-dependent heads differ.
    r18 = load_checkpoint(GOLDENS / "mask_rcnn_tiny_r18" / "state_dict.pth").state_dict
    assert list(ck.state_dict) == list(r18)
    differ = {k for k in r18 if ck.state_dict[k].shape != r18[k].shape}
    assert differ == {f"roi_head.{h}.{p}" for h in ("bbox_head.fc_cls", "bbox_head.fc_reg", "mask_head.conv_logits")
                      for p in ("weight", "bias")}
    assert ck.state_dict["roi_head.bbox_head.fc_cls.weight"].shape[0] == 3  # 2 classes + background
    assert ck.state_dict["backbone.bn1.num_batches_tracked"].dtype == np.int64


@pytest.mark.goldens
def test_reader_needs_no_torch(tmp_path):
    """The zip reader and safetensors work with torch unimportable; legacy pickles and .pth writing say why not."""
    require_goldens()
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    code = f"""
import sys
sys.modules['torch'] = None  # import torch -> ImportError
import numpy as np
from flaxdet_converters.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
g = {str(GOLDENS)!r}
a = load_checkpoint(g + '/runner_tiny_r18/epoch_1.pth')
b = load_checkpoint(g + '/mask_rcnn_tiny_swin/checkpoint.pth')
c = load_checkpoint(g + '/mask_rcnn_tiny_swin/model.safetensors')
assert a.classes == ['box', 'disc'] and all(np.array_equal(b.state_dict[k], c.state_dict[k]) for k in c.state_dict)
for fn in (lambda: load_checkpoint({str(legacy)!r}),
           lambda: save_checkpoint({str(tmp_path / 'x.pth')!r}, b.state_dict)):
    try:
        fn()
    except CheckpointError as e:
        print('ERR', e)
print('OK')
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.endswith("OK\n"), r.stderr
    errs = [line for line in r.stdout.splitlines() if line.startswith("ERR")]
    assert len(errs) == 2 and "needs torch" in errs[0] and "legacy.pth" in errs[0] and "needs torch" in errs[1]
    assert not (tmp_path / "x.pth").exists() and sorted(q.name for q in tmp_path.iterdir()) == ["legacy.pth"]


def test_legacy_format_through_torch(tmp_path):
    p = tmp_path / "legacy.pth"
    torch.save({"meta": {"CLASSES": ("a", "b")}, "state_dict": OrderedDict(w=torch.arange(3.0), n=torch.tensor(5))},
               p, _use_new_zipfile_serialization=False)
    ck = load_checkpoint(p)
    assert ck.source_format == "pth-runner" and ck.classes == ["a", "b"] and list(ck.state_dict) == ["w", "n"]
    assert ck.state_dict["n"].dtype == np.int64 and ck.state_dict["n"].shape == ()


@pytest.mark.parametrize("runner", [True, False])
def test_ddp_prefix_stripped(tmp_path, runner):
    p = tmp_path / "ddp.pth"
    sd = OrderedDict([("module.a.weight", torch.ones(2)), ("module.b", torch.zeros((), dtype=torch.int64))])
    torch.save({"state_dict": sd, "meta": {}} if runner else sd, p)
    ck = load_checkpoint(p)
    assert list(ck.state_dict) == ["a.weight", "b"] and ck.state_dict["b"].dtype == np.int64
    # only when every key has it
    torch.save(OrderedDict([("module.a", torch.ones(1)), ("b", torch.ones(1))]), p)
    assert list(load_checkpoint(p).state_dict) == ["module.a", "b"]


def test_dtypes_views_and_bfloat16(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = OrderedDict(t=base.t(), view=base[1:, 2:5], f16=torch.ones(3, dtype=torch.float16),
                     f64=torch.tensor([1.5], dtype=torch.float64), i8=torch.tensor([-3], dtype=torch.int8),
                     u8=torch.tensor([250], dtype=torch.uint8), b=torch.tensor([True, False]),
                     i32=torch.tensor([7], dtype=torch.int32), empty=torch.zeros(0, 3),
                     bf=torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16))
    torch.save(sd, tmp_path / "d.pth")
    ck = load_checkpoint(tmp_path / "d.pth")
    for k, t in sd.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        got = ck.state_dict[k]
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), k
        assert got.flags.c_contiguous and got.flags.writeable, k
    assert ck.warnings and "bfloat16" in ck.warnings[0] and "bf" in ck.warnings[0]


# ----------------------------------------------------------------------------------- hostile and broken
class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_SENTINEL']}",))


@pytest.mark.parametrize("how", ["zip", "legacy", "plain-pickle"])
def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch, how):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_SENTINEL", str(sentinel))
    p = tmp_path / "evil.pth"
    for payload in ({"state_dict": Evil()}, Evil(), {"state_dict": {"w": torch.ones(1)}, "meta": Evil()}):
        if how == "plain-pickle":
            p.write_bytes(pickle.dumps(payload, protocol=2))
        else:
            torch.save(payload, p, _use_new_zipfile_serialization=how == "zip")
        if how == "zip" and isinstance(payload, dict) and "meta" in payload:  # weights load, meta is inert
            assert load_checkpoint(p).meta == {} and not sentinel.exists()
            continue
        with pytest.raises(CheckpointError, match="not a (readable )?checkpoint") as e:
            load_checkpoint(p)
        assert "evil.pth" in str(e.value)
        assert not sentinel.exists()


def _g(module, name):  # pickle GLOBAL
    return b"c" + f"{module}\n{name}\n".encode()


def _s(text):  # pickle BINUNICODE
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(n):  # pickle BININT
    return b"J" + struct.pack("<i", n)


def _tensor(offset, size, stride, storage="FloatStorage"):
    pid = b"(" + _s("storage") + _g("torch", storage) + _s("0") + _s("cpu") + _i(4) + b"tQ"
    ints = lambda xs: b"(" + b"".join(_i(x) for x in xs) + b"t"  # noqa: E731
    return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _i(offset) + ints(size) + ints(stride)
            + b"\x89" + _g("collections", "OrderedDict") + b")R" + b"tR")


_STORAGE = np.arange(4, dtype="<f4").tobytes()  # storage "0": float32 0, 1, 2, 3


def _torch_zip(path, body, storage=_STORAGE):
    """A torch.save-layout zip whose data.pkl is `body` (pickle opcodes) -- to build what torch.save never would."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + body + b".")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", storage)
    return path


def test_crafted_pickles(tmp_path):
    sentinel = tmp_path / "pwned"
    touch = _s(f"touch {sentinel}")
    w = lambda t: b"}" + _s("w") + t + b"s"  # noqa: E731  {'w': t}
    ok = load_checkpoint(_torch_zip(tmp_path / "ok.pth", w(_tensor(0, (2, 2), (2, 1)))))
    assert np.array_equal(ok.state_dict["w"], np.arange(4, dtype=np.float32).reshape(2, 2))
    big_endian = tmp_path / "be.pth"
    with zipfile.ZipFile(big_endian, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + w(_tensor(1, (3,), (1,))) + b".")
        z.writestr("archive/byteorder", "big")
        z.writestr("archive/data/0", np.arange(4, dtype=">f4").tobytes())
    assert load_checkpoint(big_endian).state_dict["w"].tolist() == [1.0, 2.0, 3.0]
    bad = {
        # a view reaching past its storage must not read process memory
        "stride": (w(_tensor(0, (2, 2), (1_000_000, 1))), "outside its storage"),
        "offset": (w(_tensor(3, (2,), (1,))), "outside its storage"),
        "negative": (w(_tensor(-8, (2,), (1,))), "invalid offset/size/stride"),
        # os.system, getattr(__import__('os'), 'system'), eval: all become inert placeholders
        "system": (b"}" + _s("w") + _g("os", "system") + b"(" + touch + b"tRs", "no 'state_dict' and no tensors"),
        "import": (_g("builtins", "getattr") + b"(" + _g("builtins", "__import__") + b"(" + _s("os") + b"tR"
                   + _s("system") + b"tR(" + touch + b"tR", "top-level object is placeholder"),
        "eval": (_g("__builtin__", "eval") + b"(" + _s(f"open({str(sentinel)!r}, 'w')") + b"tR",
                 "top-level object is placeholder __builtin__.eval"),
        # calling the result of a call; NEWOBJ, SETITEMS, APPENDS and BUILD on placeholders
        "call-result": (_g("subprocess", "Popen") + b"(" + touch + b"tR(" + touch + b"tR",
                        "top-level object is placeholder subprocess.Popen(...)"),
        "newobj": (_g("mmengine.config", "ConfigDict") + b")\x81(" + _s("a") + _i(1) + b"u(" + _i(2) + b"e}b",
                   "top-level object is placeholder mmengine.config.ConfigDict"),
        # BUILD on a whitelisted function / tensor (would rewire it for later loads)
        "build-fn": (_g("torch._utils", "_rebuild_tensor_v2") + b"}" + _s("__defaults__") + b")sb", "modify"),
        "build-tensor": (w(_tensor(0, (2,), (1,)) + b"}" + _s("offset") + _i(10**6) + b"sb"), "modify"),
        "persid": (b"}" + _s("w") + _s("nope") + b"Qs", "persistent id"),
        "storage-type": (w(_tensor(0, (2,), (1,), storage="QInt8Storage")), "unsupported type"),
    }
    # shared and cyclic references in meta: converted once, in linear time
    dag = b"]q\x000" + b"".join(b"(h%ch%clq%c0" % (i, i, i + 1) for i in range(80)) + b"hP"  # l[i+1] = [l[i], l[i]]
    cyc = b"]q\xc8h\xc8a"  # l = []; l.append(l)
    meta = b"}" + _s("dag") + dag + b"s" + _s("cyc") + cyc + b"s"
    runner = b"}" + _s("state_dict") + w(_tensor(0, (4,), (1,))) + b"s" + _s("meta") + meta + b"s"
    ck = load_checkpoint(_torch_zip(tmp_path / "dag.pth", runner))
    assert ck.meta["cyc"][0] is ck.meta["cyc"] and ck.meta["dag"][0] is ck.meta["dag"][1]
    for name, (body, msg) in bad.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(_torch_zip(tmp_path / f"{name}.pth", body))
        assert msg in str(e.value) and f"{name}.pth" in str(e.value), (name, str(e.value))
    assert not sentinel.exists()
    # nothing leaked into later loads
    assert np.array_equal(load_checkpoint(tmp_path / "ok.pth").state_dict["w"], ok.state_dict["w"])


def test_corrupted_pickles_fail_cleanly(tmp_path):
    """Random byte damage in data.pkl gives a load or a CheckpointError, never another exception."""
    src = tmp_path / "src.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ("a", "b")}, "x": {1, 2}, "y": b"\x00\xff"},
                "state_dict": OrderedDict(w=torch.randn(3, 2).t(), n=torch.tensor(4), h=torch.ones(2).half())}, src)
    ck = load_checkpoint(src)
    assert ck.meta["x"] == {1, 2} and ck.meta["y"] == b"\x00\xff" and ck.classes == ["a", "b"]
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl_name = next(n for n in members if n.endswith("/data.pkl"))
    rng, outcomes = random.Random(0), {"ok": 0, "error": 0}
    for i in range(300):
        data = bytearray(members[pkl_name])
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 10 == 0:
            data = data[: rng.randrange(len(data))]
        p = tmp_path / "mut.pth"
        with zipfile.ZipFile(p, "w") as z:
            for n, b in members.items():
                z.writestr(n, bytes(data) if n == pkl_name else b)
        try:
            load_checkpoint(p)
            outcomes["ok"] += 1
        except CheckpointError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100, outcomes


@pytest.mark.goldens
def test_bad_inputs(tmp_path):
    require_goldens()
    good, st = GOLDENS / "mask_rcnn_tiny_r18" / "state_dict.pth", GOLDENS / "mask_rcnn_tiny_r18" / "model.safetensors"
    cases = {"missing": (tmp_path / "nope.pth", "not found"), "dir": (tmp_path, "not found")}
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.pth", "empty file")
    (tmp_path / "trunc.pth").write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.6)])
    cases["trunc"] = (tmp_path / "trunc.pth", "truncated or corrupt")
    (tmp_path / "trunc.safetensors").write_bytes(st.read_bytes()[: int(st.stat().st_size * 0.6)])
    cases["trunc_st"] = (tmp_path / "trunc.safetensors", "truncated or corrupt")
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint")
    cases["text"] = (tmp_path / "notes.txt", "not a checkpoint")
    (tmp_path / "text.pth").write_text("model = dict(type='MaskRCNN')\n")
    cases["text_pth"] = (tmp_path / "text.pth", "not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases["list"] = (tmp_path / "list.pth", "top-level object is list")
    torch.save({"a": 1}, tmp_path / "dict.pth")
    cases["dict"] = (tmp_path / "dict.pth", "dict with keys ['a'] but no 'state_dict' and no tensors")
    torch.save({"state_dict": {"w": torch.ones(1), "step": 3}}, tmp_path / "mixed.pth")
    cases["mixed"] = (tmp_path / "mixed.pth", "non-tensor entries [\"'step': int\"]")
    torch.save({"state_dict": {}}, tmp_path / "nosd.pth")
    cases["nosd"] = (tmp_path / "nosd.pth", "'state_dict' is empty")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    cases["zip"] = (tmp_path / "other.zip", "not a checkpoint: a zip archive without")
    for name, (path, msg) in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert msg in str(e.value) and str(path.name) in str(e.value), (name, str(e.value))


# ------------------------------------------------------------------------------------------------ saving
@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_save_round_trip_and_atomicity(tmp_path, ext):
    rng = np.random.default_rng(0)
    sd = OrderedDict(z_last_by_name=rng.standard_normal((2, 3)).astype(np.float32), n=np.array(7, np.int64),
                     h=np.ones(2, np.float16), d=np.array([np.pi]), b=np.array([True, False]),
                     i=np.arange(3, dtype=np.int32), u=np.arange(3, dtype=np.uint8),
                     view=np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2], a_first=np.zeros((0, 2), np.float32))
    p = tmp_path / f"m.{ext}"
    assert save_checkpoint(p, sd, classes=["x", "y"]) == p
    ck = load_checkpoint(p)
    assert ck.classes == ["x", "y"] and list(ck.state_dict) == list(sd)  # order kept in both formats
    for k, v in sd.items():
        got = ck.state_dict[k]
        assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == np.ascontiguousarray(v).tobytes(), k
    before = p.read_bytes()
    for bad in ({"ok": np.ones(2, np.float32), "bad": np.array([object()], dtype=object)}, {1: np.ones(1)}):
        with pytest.raises(CheckpointError, match="cannot save"):
            save_checkpoint(p, bad)
    assert p.read_bytes() == before and [q.name for q in tmp_path.iterdir()] == [p.name]  # untouched, no temp files
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        save_checkpoint(tmp_path / "m.bin", sd)
    assert [q.name for q in tmp_path.iterdir()] == [p.name]
    # a raw state_dict without classes; format given explicitly
    q = tmp_path / "raw.weights"
    save_checkpoint(q, sd, format=ext)
    raw = load_checkpoint(q)
    assert raw.classes is None and list(raw.state_dict) == list(sd)
    assert raw.source_format == ("pth-state-dict" if ext == "pth" else "safetensors")


def test_save_pth_is_a_runner_checkpoint_torch_reads(tmp_path):
    p = tmp_path / "r.pth"
    save_checkpoint(p, {"w": np.ones((2, 2), np.float32), "n": np.array(0, np.int64)}, classes=("a",),
                    meta={"epoch": 3, "dataset_meta": {"palette": [(1, 2, 3)]}})
    obj = torch.load(p, weights_only=True)
    assert obj["meta"] == {"epoch": 3, "dataset_meta": {"palette": [(1, 2, 3)], "classes": ["a"]}}
    assert obj["state_dict"]["n"].dtype == torch.int64 and obj["state_dict"]["n"].shape == ()
    ck = load_checkpoint(p)
    assert ck.source_format == "pth-runner" and ck.meta["epoch"] == 3 and ck.classes == ["a"]


def test_save_failure_inside_the_writer_leaves_nothing(tmp_path):
    p = tmp_path / "m.pth"
    save_checkpoint(p, {"w": np.ones(2, np.float32)})
    before = p.read_bytes()
    with pytest.raises(CheckpointError, match="could not write"):  # torch.save cannot pickle a lambda
        save_checkpoint(p, {"w": np.zeros(2, np.float32)}, meta={"f": lambda: 0})
    assert p.read_bytes() == before and [q.name for q in tmp_path.iterdir()] == [p.name]
    (tmp_path / "d.safetensors").mkdir()  # written, then os.replace onto a directory fails
    with pytest.raises(CheckpointError, match="could not write"):
        save_checkpoint(tmp_path / "d.safetensors", {"w": np.ones(2, np.float32)})
    assert sorted(q.name for q in tmp_path.iterdir()) == ["d.safetensors", p.name]
    assert not any((tmp_path / "d.safetensors").iterdir())
    with pytest.raises(CheckpointError, match="reserved"):  # safetensors would write a file it cannot read
        save_checkpoint(tmp_path / "x.safetensors", {"__metadata__": np.ones(2, np.float32)})


# ------------------------------------------------------------------------------------ config from meta.cfg
@pytest.mark.goldens
def test_parse_python_config():
    require_goldens()
    text = (RUNNER / "runner_config.py").read_text()
    want = _plain(yaml.safe_load((RUNNER / "model.yaml").read_text()))
    assert _plain(parse_python_config(text)["model"]) == want
    assert _plain(parse_python_config(text, strict=False)["model"]) == want
    assert parse_python_config("a = dict(b=[1, -2.5, (3,)], c=None, d={'k': +1, 2: {True}})\nimport os\n",
                               strict=False) == {"a": {"b": [1, -2.5, (3,)], "c": None, "d": {"k": 1, 2: {True}}}}
    assert parse_python_config("a = 1\nb = os.system('x')\nc = 2\n", strict=False) == {"a": 1, "c": 2}
    bad = {"import os\nmodel = dict(a=1)\n": "line 1", "a = 1\nx = os.system('echo hi')\n": "line 2",
           "a = 1\n\nb = dict(c=f'{a}')\n": "line 3", "a = lambda: 0\n": "line 1", "a = dict(b=x.y)\n": "line 1",
           "a = dict(**b)\n": "line 1", "a = {[1]: 2}\n": "unhashable", "a = (\n": "not valid Python",
           "for i in []: pass\n": "line 1", "a = -'x'\n": "line 1", "a = __import__('os')\n": "line 1"}
    for text, msg in bad.items():
        with pytest.raises(CheckpointError, match=msg):
            parse_python_config(text)


def test_model_cfg_from_meta_cfg(tmp_path):
    p = tmp_path / "c.pth"
    cfg = "import os\nmodel = dict(type='MaskRCNN', backbone=dict(depth=18, out_indices=(0, 1)))\nx = os.getcwd()\n"
    torch.save({"meta": {"cfg": cfg}, "state_dict": {"w": torch.ones(1)}}, p)
    ck = load_checkpoint(p)
    assert ck.model_cfg == {"type": "MaskRCNN", "backbone": {"depth": 18, "out_indices": (0, 1)}}
    torch.save({"meta": {"cfg": "model = dict(a=1\n"}, "state_dict": {"w": torch.ones(1)}}, p)
    ck = load_checkpoint(p)
    assert ck.model_cfg is None and "meta.cfg could not be parsed" in ck.warnings[0]
