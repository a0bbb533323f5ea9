"""Fine-tuning Mask R-CNN: kill-and-resume equals an uninterrupted run (the grain loader with two worker processes,
its state in the checkpoints, and the thread loader), with the run tracked in TensorBoard and MLflow, and 8 devices
equal 1 (these in the slow suite); empty and crowded images give finite losses, a new class count re-initialises
only the class-dependent layers."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from flaxdet.data.synthetic import make_synthetic_coco
from parity_tests.goldens import GOLDENS, require_goldens

TRAIN_ARGS = ["--steps", "4", "--batch-size", "2", "--scale", "160", "128", "--ckpt-every", "1", "--max-gt", "8",
              "--optimizer", "sgd", "--lr", "0.002", "--warmup-iters", "2", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_goldens()
    d = tmp_path_factory.mktemp("train")
    ann = make_synthetic_coco(d / "data", num_images=8, seed=3, min_size=(96, 128), max_size=(128, 160))
    r = _cli("convert", GOLDENS / "mask_rcnn_tiny_r18" / "checkpoint.pth", "--config",
             GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml", "--out", d / "model")
    assert r.returncode == 0, r.stderr
    return d, ann


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flaxdet.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=env)


def _params(model_dir):
    from flaxdet.checkpoint import _flat_state, load_model_dir

    return _flat_state(load_model_dir(model_dir)[0])


@pytest.mark.goldens
# Both loaders in the slow suite (~115 s each on 2 cores); the default run kills and resumes an RTMDet-Ins run on the
# grain loader instead (tests/training/test_rtmdet_train.py), keeping CI's default run under 20 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("loader", ["grain", "thread"])
def test_kill_and_resume_equals_uninterrupted(setup, loader):
    d, ann = setup
    d = d / loader
    mlruns = f"file:{d / 'mlruns'}"
    extra = ["--workers", "2", "--mlflow", mlruns] if loader == "grain" else ["--loader", "thread"]
    base = ["train", "--checkpoint", d.parent / "model", "--ann", ann, *TRAIN_ARGS, *extra]
    r = _cli(*base, "--out", d / "straight")
    assert r.returncode == 0, r.stderr[-3000:]
    # the same run, SIGKILLed once its step-2 checkpoint is on disk, then resumed by the same command
    proc = subprocess.Popen([sys.executable, "-m", "flaxdet.cli", *map(str, base), "--out", str(d / "killed")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ck = d / "killed" / "checkpoints"
    t0 = time.time()
    while not (ck / "2").is_dir() and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (d / "killed" / "model").exists(), "killed too late to test resuming"
    if loader == "grain":  # the pipeline's position is in the checkpoint (grain's state, one file per process)
        state = json.loads((ck / "2" / "data" / "process_0-of-1.json").read_text())
        assert state["next_step"] == 2 and state["workers"] == 2 and state["grain"]
    r = _cli(*base, "--out", d / "killed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stdout
    a, b = _params(d / "straight" / "model"), _params(d / "killed" / "model")
    assert all(np.array_equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    la = [json.loads(x) for x in (d / "straight" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (d / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps_b = [x["step"] for x in lb]
    assert steps_b[-1] == 4 and (d / "killed" / "loss_curve.png").is_file()
    by_step = {x["step"]: x["loss"] for x in lb}
    assert all(by_step[x["step"]] == x["loss"] for x in la), "per-step losses must match"
    if loader == "grain":
        _check_tracking(d, la, mlruns)
    # frozen stem + layer1 (frozen_stages=1) did not move; later stages did
    src = _params(d.parent / "model")
    assert np.array_equal(a["backbone.conv1.weight"], src["backbone.conv1.weight"])
    assert np.array_equal(a["backbone.layer1.0.conv1.weight"], src["backbone.layer1.0.conv1.weight"])
    assert np.array_equal(a["backbone.bn1.running_mean"], src["backbone.bn1.running_mean"])
    # the two-stage family's BN never trains (norm_eval): no statistic or counter moved anywhere
    stats = [k for k in src if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(np.array_equal(a[k], src[k]) for k in stats)
    assert not np.array_equal(a["backbone.layer2.0.conv1.weight"], src["backbone.layer2.0.conv1.weight"])


def _check_tracking(d, rows, mlruns):
    """TensorBoard events (read by tensorboard's own EventAccumulator) and the MLflow runs (read by MLflow's client
    from the file store) hold the metrics.jsonl losses; the killed run's MLflow run was continued, not duplicated,
    and TensorBoard purged what the killed attempt logged past its checkpoint."""
    want = [(x["step"], x["loss"]) for x in rows]
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    for run in ("straight", "killed"):
        ea = ea_mod.EventAccumulator(str(d / run / "tensorboard"))
        ea.Reload()
        got = [(e.step, e.value) for e in ea.Scalars("train/loss")]
        assert [s for s, _ in got] == [s for s, _ in want], (run, got)
        assert np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-6), (run, got, want)
    mlflow = pytest.importorskip("mlflow")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = mlflow.tracking.MlflowClient(tracking_uri=mlruns)
    runs = {r.data.tags["flaxdet.run_dir"]: r for r in
            client.search_runs([client.get_experiment_by_name("flaxdet").experiment_id])}
    assert sorted(runs) == sorted(str((d / x).resolve()) for x in ("straight", "killed"))
    for run in ("straight", "killed"):
        info = runs[str((d / run).resolve())]
        assert info.info.status == "FINISHED" and info.data.params["batch_size"] == "2"
        assert json.loads((d / run / "mlflow.json").read_text())["run_id"] == info.info.run_id
        hist = {}
        for m in sorted(client.get_metric_history(info.info.run_id, "loss"), key=lambda m: m.timestamp):
            hist[m.step] = m.value  # the resumed run's value last for the steps logged twice
        assert sorted(hist) == [s for s, _ in want] and np.allclose([hist[s] for s, _ in want], [v for _, v in want])
        arts = {a.path for a in client.list_artifacts(info.info.run_id, "model")}
        assert {"model/config.yaml", "model/meta.json"} <= arts, arts


DP_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import jax, numpy as np
    from flaxdet.checkpoint import load_model_dir
    from flaxdet.data.coco import CocoDataset, TrainLoader
    from flaxdet.training.loop import _mesh_and_shardings, adapt_num_classes, shard_batch
    from flaxdet.training.optimizers import make_optimizer
    from flaxdet.training.step import TrainState
    assert len(jax.devices()) == 8, jax.devices()
    model_dir, ann = sys.argv[1], sys.argv[2]
    ds = CocoDataset(ann)
    batch, _ = TrainLoader(ds, 8, (160, 128), 8).make_batch(0)
    out = {}
    for n in (1, 8):
        model = adapt_num_classes(load_model_dir(model_dir)[0], ds.classes, log=lambda *a: None)
        tx, _ = make_optimizer("sgd", 0.01, 1e-4, 1, 1)
        st = TrainState(model, tx)
        mesh, data_sh, repl = _mesh_and_shardings(n)
        st.params, st.opt_state, st.rest = jax.device_put((st.params, st.opt_state, st.rest), repl)
        logs = st.train_step(shard_batch(batch, data_sh), jax.random.PRNGKey(0))
        leaves = jax.tree.leaves(jax.device_get(st.params))
        out[n] = (float(logs["loss"]), leaves, len(jax.tree.leaves(st.params)[0].sharding.device_set))
    (l1, p1, d1), (l8, p8, d8) = out[1], out[8]
    err = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)) for a, b in zip(p1, p8))
    print(json.dumps(dict(loss1=l1, loss8=l8, max_rel_param_diff=err, devices=[d1, d8])))
""")


@pytest.mark.slow  # ~140 s on 2 cores; the default run has RTMDet's 8-devices-equal-1 step (~75 s) instead
@pytest.mark.goldens
def test_eight_devices_equal_one(setup):
    d, ann = setup
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", DP_SCRIPT, str(d / "model"), str(ann)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["devices"] == [1, 8]
    # the loss: 1e-4 relative. Per-device convolutions run at batch 1 instead of 8 and XLA may block them
    # differently; on an AVX-512 Xeon (2026-12) that float noise moved one discrete choice upstream of the
    # loss (a proposal/sampling tie), observed 5.2e-5 relative (the same at the previous commit's code)
    assert abs(res["loss1"] - res["loss8"]) <= 1e-4 * abs(res["loss1"]), res
    # same math, different reduction order across 8 shards: float32 noise in the gradients (observed 3.2e-5
    # of a tensor's scale after one SGD step, lr 0.01, on an AMD EPYC). On an AVX-512 Xeon (2026-12) the
    # discrete choice above (likely a mask-target pixel at the 0.5 threshold) gave 2.9e-4, identical at the
    # previous commit's code: 5e-4. Injecting the samples here would make this exact again (open).
    assert res["max_rel_param_diff"] <= 5e-4, res


@pytest.mark.goldens
def test_empty_and_crowded_images_train(tmp_path):
    """An image without GT and one with many GT both give finite losses."""
    import jax

    from flaxdet.config import load_config
    from flaxdet.data.transforms import own_pad_shape, pad_ground_truth
    from flaxdet.models import build_detector
    from flaxdet.training.step import loss_and_grads

    require_goldens()
    model = build_detector(load_config(GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml"))
    rng = np.random.default_rng(0)
    h, w = 96, 128
    many = rng.uniform(0, 80, (60, 2))
    boxes = np.concatenate([many, many + rng.uniform(4, 40, (60, 2))], 1).clip(0, 127).astype(np.float32)
    masks = np.zeros((60, h, w), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        masks[i, y1:y2, x1:x2] = 1
    gts = [dict(bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64), masks=np.zeros((0, h, w))),
           dict(bboxes=boxes, labels=rng.integers(0, 5, 60), masks=masks)]
    batch = dict(images=rng.integers(0, 255, (2, h, w, 3)).astype(np.uint8),
                 img_shapes=np.array([[h, w]] * 2, np.int32),
                 pad_shapes=np.array([own_pad_shape((h, w))] * 2, np.int32))
    batch.update(pad_ground_truth(gts, 64, h, w))
    logs, grads = loss_and_grads(model, batch, jax.random.PRNGKey(0))
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert all(np.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("cascade", [False, True], ids=["mask_rcnn", "cascade_mask_rcnn"])
def test_adapt_num_classes_reinitialises_only_class_dependent_layers(cascade):
    """`flaxdet train` on a dataset with another class count: fc_cls (and fc_reg unless class-agnostic, as
    a cascade's are) and conv_logits of every stage re-initialised the visdet way, everything else kept."""
    from flaxdet.config import final_bbox_head
    from flaxdet.models import build_detector
    from flaxdet.training.loop import adapt_num_classes
    from flaxdet_converters.convert import export_visdet_state_dict
    from parity_tests.test_cascade import small_cascade_cfg

    cfg = small_cascade_cfg(mask=True, classes=5)
    if not cascade:  # the same backbone/neck/RPN with a standard Mask R-CNN RoI head
        from flaxdet.config import load_config

        std = load_config("mask_rcnn_r50").roi_head
        std = dataclasses.replace(
            std, bbox_head=dataclasses.replace(std.bbox_head, in_channels=cfg.roi_head.bbox_head[0].in_channels,
                                               fc_out_channels=32, num_classes=5),
            bbox_roi_extractor=dataclasses.replace(std.bbox_roi_extractor,
                                                   out_channels=cfg.roi_head.bbox_roi_extractor[0].out_channels),
            mask_head=dataclasses.replace(std.mask_head, in_channels=cfg.roi_head.bbox_head[0].in_channels,
                                          conv_out_channels=8, num_classes=5),
            mask_roi_extractor=dataclasses.replace(std.mask_roi_extractor,
                                                   out_channels=cfg.roi_head.bbox_roi_extractor[0].out_channels))
        cfg = dataclasses.replace(load_config("mask_rcnn_r50"), backbone=cfg.backbone, neck=cfg.neck,
                                  rpn_head=cfg.rpn_head, roi_head=std)
    model = build_detector(cfg)
    before = export_visdet_state_dict(model)
    new = adapt_num_classes(model, ["a", "b", "c"], log=lambda *a: None)
    after = export_visdet_state_dict(new)
    assert final_bbox_head(new.cfg.roi_head).num_classes == 3 and list(after) == list(before)
    changed = {k for k in after if after[k].shape != before[k].shape or not np.array_equal(after[k], before[k])}
    stages = [f".{i}" for i in range(3)] if cascade else [""]
    layers = [f"bbox_head{s}.fc_cls" for s in stages] + [f"mask_head{s}.conv_logits" for s in stages]
    if not cascade:
        layers.append("bbox_head.fc_reg")  # class-specific regression: 4 * num_classes outputs
    assert changed == {f"roi_head.{m}.{p}" for m in layers for p in ("weight", "bias")}
    w = after["roi_head.bbox_head" + stages[-1] + ".fc_cls.weight"]
    assert w.shape[0] == 4 and 0.005 < w.std() < 0.02  # visdet's N(0, 0.01), background row included
