"""Run tracking without a model (flaxdet.training.tracking): TensorBoard events and an MLflow run written, resumed and
finished as the train loop drives them, read back with tensorboard's EventAccumulator and MLflow's client; the train
command's new options checked before any work; a run folder from before the grain loader resumes only with it off."""
from __future__ import annotations

import json
import os

import pytest

from flaxdet.cli import main

ROWS = [dict(step=s, epoch=0, lr=0.01, loss=1.0 / s, loss_cls=0.5 / s, images_per_s=3.0) for s in (1, 2, 3, 4)]


def test_tensorboard_and_mlflow_resume(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    mlflow = pytest.importorskip("mlflow")
    from flaxdet.training.tracking import Trackers

    uri = f"file:{tmp_path / 'mlruns'}"
    out = tmp_path / "run"
    out.mkdir()
    settings = dict(batch_size=2, optimizer="sgd", scale=[160, 128])
    t = Trackers(out, 0, settings, mlflow_uri=uri, log=lambda *a: None)
    for r in ROWS[:3]:  # a killed attempt: logged steps 1-3, its last checkpoint at step 2
        t.log(r)
    t.flush()
    t.close("RUNNING")
    t = Trackers(out, 2, settings, mlflow_uri=uri, log=lambda *a: None)  # resumed at step 2
    for r in ROWS[2:]:
        t.log(dict(r, loss=r["loss"] + 1))
    (out / "model").mkdir()
    (out / "model" / "meta.json").write_text("{}")
    t.finish(out / "model")
    t.close("FINISHED")

    ea = ea_mod.EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    got = [(e.step, round(e.value, 6)) for e in ea.Scalars("train/loss")]
    assert got == [(1, 1.0), (2, 0.5), (3, round(1 / 3 + 1, 6)), (4, 1.25)], got  # step 3 of the killed attempt purged
    assert "train/images_per_s" in ea.Tags()["scalars"]

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("flaxdet").experiment_id])
    assert len(runs) == 1  # the resumed run continued the killed attempt's MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["scale"] == "[160, 128]"
    assert json.loads((out / "mlflow.json").read_text())["run_id"] == run.info.run_id
    hist = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in hist] == [1, 2, 3, 3, 4]  # MLflow keeps both values of step 3, the resumed one last
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/meta.json"]


def test_mlflow_unreachable_is_one_error(tmp_path):
    pytest.importorskip("mlflow")
    from flaxdet.config import ConfigError
    from flaxdet.training.tracking import MLflowLog

    bad = tmp_path / "a_file"
    bad.write_text("not a store")
    with pytest.raises(ConfigError, match="--mlflow"):
        MLflowLog(tmp_path, f"file:{bad}", "flaxdet", {}, log=lambda *a: None)


@pytest.mark.parametrize("extra, msg", [
    (["--workers", "-1"], "--workers -1"),
    (["--workers", "2", "--loader", "thread"], "--loader grain"),
    (["--coordinator", "127.0.0.1:1"], "together"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1"], "0 .. N-1"),
    (["--distributed", "--process-id", "0"], "--distributed"),
])
def test_train_options_checked_first(tmp_path, capsys, extra, msg):
    rc = main(["train", "--checkpoint", str(tmp_path), "--ann", str(tmp_path / "a.json"), "--out",
               str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err, err


def test_run_folder_before_grain_resumes_with_the_thread_loader(tmp_path):
    from flaxdet.training.loop import ResumeError, TrainConfig, check_resume_settings, run_settings

    cfg = TrainConfig(tmp_path / "m", tmp_path / "a.json", tmp_path, scale=(160, 128), loader="thread")
    old = run_settings(cfg, cfg.scale)
    del old["loader"]  # run.json of a run from before the grain loader
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(ResumeError, match="loader: 'thread' -> 'grain'"):
        grain = TrainConfig(tmp_path / "m", tmp_path / "a.json", tmp_path, scale=(160, 128))
        check_resume_settings(tmp_path, run_settings(grain, grain.scale), resuming=True, force=False)
    check_resume_settings(tmp_path, run_settings(cfg, cfg.scale), resuming=True, force=False)
