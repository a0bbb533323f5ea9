"""`make demo-rtmdet` (``python -m flaxdet.demo --family rtmdet_ins``) end to end with a handful of steps: the
recorded visdet RTMDet-Ins case when the goldens are present, and the seeded fallback checkpoint the demo writes
without them. Slow (about 4 min each on 2 busy cores: the parity run, the train step and two eval shapes compile)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flaxdet_converters.checkpoint_io import load_checkpoint

STEPS = 3


def _demo(out, **env):
    env = dict(os.environ, FLAXDET_DEMO_STEPS=str(STEPS), FLAXDET_DEMO_OUT=str(out), **env)
    r = subprocess.run([sys.executable, "-m", "flaxdet.demo", "--family", "rtmdet_ins"], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _check(out, stdout):
    s = json.loads((out / "summary.json").read_text())
    assert s["family"] == "RTMDet-Ins" and s["steps"] == STEPS
    assert s["parity_passed"] is True
    assert s["train"]["optimizer"] == "rtmdet_adamw" and s["train"]["ema"] is True
    assert s["reference_equal"] is True and s["map_after"] == s["reference_map_after"]  # same weights, same mAP
    assert s["loss_first"] > 0 and s["loss_last"] > 0
    assert "PASS" in stdout and "equal to flaxdet's" in stdout
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and "loss_mask" in rows[0]
    meta = json.loads((out / "run" / "model" / "meta.json").read_text())
    assert "EMA" in json.dumps(meta)  # model/ holds the EMA weights, which eval, infer and export use
    back = load_checkpoint(out / "fine_tuned_visdet.pth")
    assert list(back.classes) == ["circle", "square", "triangle"]
    assert back.state_dict["bbox_head.rtm_cls.0.weight"].shape[0] == 3
    assert any(k.endswith("running_var") for k in back.state_dict)
    assert sorted(p.suffix for p in (out / "infer" / "overlays").iterdir()) == [".png", ".png"]


@pytest.mark.slow
@pytest.mark.goldens
def test_demo_rtmdet_ins_recorded_case(tmp_path):
    stdout = _demo(tmp_path)
    assert "recorded visdet case" in stdout
    _check(tmp_path, stdout)


@pytest.mark.slow
def test_demo_rtmdet_ins_seeded_fallback(tmp_path):
    stdout = _demo(tmp_path / "demo", FLAXDET_GOLDENS=str(tmp_path / "no_goldens"))
    assert "no goldens found" in stdout
    assert (tmp_path / "demo" / "seeded_visdet.pth").is_file()
    _check(tmp_path / "demo", stdout)
