"""One error path for every command (issue 19): ``flaxdet <cmd>: error: <what, where, what to do>`` on one line, exit
code 2, no traceback unless ``--debug``. The table runs the real CLI entry point in-process (``flaxdet.cli.main``,
stderr captured); one case also runs it as a subprocess. The cases that must read a model use the recorded
mask_rcnn_tiny_r18 golden."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import zipfile

import pytest

import flaxdet.checkpoint as checkpoint_mod
from flaxdet.cli import main
from flaxdet.data.synthetic import make_synthetic_coco
from parity_tests.goldens import GOLDENS, require_goldens
from tests.reliability.test_annotations import CASES as ANN_CASES
from tests.reliability.test_annotations import _damage
from tests.reliability.test_checkpoint_caps import _sd, _tensor
from tests.reliability.test_config_caps import PRESET, _bomb

pytestmark = pytest.mark.goldens
CASE = "mask_rcnn_tiny_r18"


def G(name):
    return GOLDENS / CASE / name


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def _one_line(rc, err, command, match):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"flaxdet {command}: error: "), err
    assert "Traceback" not in err and match in lines[0], lines[0]
    return lines[0]


def _config(tmp, text, name="bad.yaml"):
    p = tmp / name
    p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return p


def _golden_config_with(old, new):
    text = G("config.yaml").read_text()
    assert old in text, old
    return text.replace(old, new, 1)


# (id, builder(tmp) -> argv, match)
def _convert(tmp, config=None, out=None, ckpt=None, *extra):
    return ["convert", ckpt or G("state_dict.pth"), "--config", config or G("config.yaml"),
            "--out", out or tmp / "m", *extra]


def _file(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def _not_model_dir(tmp):
    d = tmp / "photos"
    d.mkdir()
    (d / "keep.jpg").write_text("precious")
    return d


def _lying_pth(tmp):
    n = 2**29
    p = tmp / "lying.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + _sd(_tensor(0, (n,), (1,), n)) + b".")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", bytes(16))
    return p


TABLE = {
    # --out
    "out_is_a_file": (lambda t: _convert(t, out=_file(t)), "is an existing file"),
    "out_under_a_file": (lambda t: _convert(t, out=_file(t) / "sub"), "is a file, so no directory"),
    "overwrite_other_dir": (lambda t: _convert(t, None, _not_model_dir(t), None, "--overwrite"),
                            "not a flaxdet model directory"),
    "out_nonempty": (lambda t: _convert(t, out=_not_model_dir(t)), "exists and is not empty"),
    "infer_out_is_a_file": (lambda t: ["infer", "--checkpoint", t, "--images", "x.jpg", "--out", _file(t)],
                            "is an existing file"),
    "export_out_is_a_dir": (lambda t: ["export", t, "--out", t], "is a directory"),
    "export_out_suffix": (lambda t: ["export", t, "--out", t / "model.bin"], "unknown checkpoint format"),
    # CLI numbers
    "batch_size_0": (lambda t: ["infer", "--checkpoint", t, "--images", "x.jpg", "--out", t / "o",
                                "--batch-size", "0"], "--batch-size must be >= 1"),
    "train_batch_size_0": (lambda t: ["train", "--checkpoint", t, "--ann", "a.json", "--out", t / "r",
                                      "--batch-size", "0"], "--batch-size must be >= 1"),
    "scale_0_0": (lambda t: ["infer", "--checkpoint", t, "--images", "x.jpg", "--out", t / "o", "--scale", "0", "0"],
                  "--scale takes two positive integers"),
    "scale_text": (lambda t: ["parity", "--checkpoint", "c.pth", "--image", "x.jpg", "--out", t / "o",
                              "--scale", "a", "b"], "--scale takes two positive integers"),
    "score_thr": (lambda t: ["infer", "--checkpoint", t, "--images", "x.jpg", "--out", t / "o", "--score-thr", "3"],
                  "--score-thr must be between 0 and 1"),
    "num_classes_0": (lambda t: _convert(t, None, None, None, "--num-classes", "0"), "--num-classes must be >= 1"),
    # config values
    "depth_eighteen": (lambda t: _convert(t, _config(t, _golden_config_with("depth: 18", "depth: eighteen"))),
                       "'backbone.depth' in"),
    "out_channels_str": (lambda t: _convert(t, _config(t, _golden_config_with("  out_channels: 32",
                                                                              '  out_channels: "32"'))),
                         "must be an integer, got '32'"),
    "out_channels_neg": (lambda t: _convert(t, _config(t, _golden_config_with("  out_channels: 32",
                                                                              "  out_channels: -32"))),
                         "must be >= 1, got -32"),
    "base_channels_0": (lambda t: _convert(t, _config(t, _golden_config_with("base_channels: 16",
                                                                             "base_channels: 0"))),
                        "'backbone.base_channels' in"),
    "binary_config": (lambda t: _convert(t, _config(t, bytes(range(256)) * 8)), "binary file, not a YAML config"),
    "alias_bomb_config": (lambda t: _convert(t, _config(t, PRESET.replace("style: pytorch", "style:\n" + _bomb("    ")
                                                                          + "\n  norm_eval: true", 1))),
                          "alias bomb"),
    "missing_config": (lambda t: _convert(t, t / "nope.yaml"), "config file not found"),
    # checkpoints
    "checkpoint_lies": (lambda t: _convert(t, None, None, _lying_pth(t)), "declares 536870912 elements"),
    "checkpoint_is_a_dir": (lambda t: _convert(t, None, None, t), "(a directory)"),
}


@pytest.mark.parametrize("case", sorted(TABLE))
def test_error_table(case, tmp_path, capsys, monkeypatch):
    require_goldens()
    monkeypatch.chdir(tmp_path)
    build, match = TABLE[case]
    argv = build(tmp_path)
    rc, err = _run(argv, capsys)
    _one_line(rc, err, argv[0], match)
    assert not (tmp_path / "m").exists()


def test_read_only_folder(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(ro) else real(p, mode))
    try:
        rc, err = _run(_convert(tmp_path, out=ro / "m"), capsys)
        _one_line(rc, err, "convert", "cannot write in")
        rc, err = _run(["infer", "--checkpoint", tmp_path, "--images", "x.jpg", "--out", ro / "o"], capsys)
        _one_line(rc, err, "infer", "permission denied")
    finally:
        ro.chmod(0o755)


def test_overwrite_of_the_current_directory(tmp_path, capsys, monkeypatch):
    """`--out . --overwrite` from inside a folder of photos must not delete it; from inside a model directory
    neither (it is where the shell is)."""
    photos = _not_model_dir(tmp_path)
    monkeypatch.chdir(photos)
    rc, err = _run(_convert(tmp_path, out=".", ckpt=None) + ["--overwrite"], capsys)
    _one_line(rc, err, "convert", "not a flaxdet model directory")
    assert (photos / "keep.jpg").read_text() == "precious"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.yaml").write_text("type: MaskRCNN\n")
    (model / "meta.json").write_text(json.dumps({"flaxdet_version": "0"}))
    monkeypatch.chdir(model)
    rc, err = _run(_convert(tmp_path, out=".") + ["--overwrite"], capsys)
    _one_line(rc, err, "convert", "current directory")
    assert (model / "config.yaml").is_file()


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return make_synthetic_coco(root, num_images=2, seed=0, min_size=(64, 64), max_size=(64, 64))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    require_goldens()
    from flaxdet.tools import convert_checkpoint

    out = tmp_path_factory.mktemp("model") / "m"
    convert_checkpoint(G("checkpoint.pth"), G("config.yaml"), out, log=lambda *a: None)
    return out


@pytest.mark.parametrize("case", sorted(ANN_CASES))
def test_training_annotations(case, model_dir, train_set, tmp_path, capsys):
    data = _damage(json.loads(train_set.read_text()), case)
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(data))
    rc, err = _run(["train", "--checkpoint", model_dir, "--ann", ann, "--images", train_set.parent / "images",
                    "--out", tmp_path / "run", "--steps", "1", "--batch-size", "1", "--no-progress"], capsys)
    _one_line(rc, err, "train", ANN_CASES[case])


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_disk_full_during_convert(fmt, model_dir, tmp_path, capsys, monkeypatch):
    """The write fails half-way with ENOSPC: one line, nothing half-written, an existing model untouched."""
    import shutil

    target = tmp_path / "m"
    shutil.copytree(model_dir, target)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))

    def full(*args, **kwargs):
        tmp = next(p for p in tmp_path.iterdir() if p.name.startswith(".") and ".tmp-" in p.name)
        (tmp / "half.bin").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "half.bin"))

    if fmt == "orbax":
        monkeypatch.setattr(checkpoint_mod.ocp.StandardCheckpointer, "save", full)
    else:
        monkeypatch.setattr(checkpoint_mod, "save_checkpoint", full)
    for out, extra in ((tmp_path / "new", []), (target, ["--overwrite"])):
        rc, err = _run(_convert(tmp_path, out=out) + ["--format", fmt, *extra], capsys)
        _one_line(rc, err, "convert", "No space left on device")
    assert not (tmp_path / "new").exists()
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(Exception, match="is an existing file"):
        main(["convert", str(G("state_dict.pth")), "--out", str(_file(tmp_path)), "--debug"])


def test_subprocess_one_line(tmp_path):
    """The installed entry point, as a user runs it."""
    r = subprocess.run([sys.executable, "-m", "flaxdet.cli", "infer", "--checkpoint", str(tmp_path), "--images",
                        "x.jpg", "--out", str(tmp_path / "o"), "--batch-size", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "flaxdet infer: error: --batch-size must be >= 1, got 0"
