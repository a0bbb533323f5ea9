"""Run tracking for `flaxdet train`: TensorBoard event files in the run folder, MLflow when asked.

* **TensorBoard** (tensorboardX, on by default): ``OUT/tensorboard/events.out.tfevents...``; every numeric value of
  a ``metrics.jsonl`` row as the scalar ``train/<name>`` at its step. A resumed run opens the writer with
  ``purge_step`` = the resumed step + 1, so TensorBoard drops what a killed attempt logged past the checkpoint.
  ``tensorboard --logdir OUT`` shows it.
* **MLflow** (``--mlflow URI``; the optional ``mlflow`` extra, ``mlflow-skinny``): one MLflow run per run folder
  (its id kept in ``OUT/mlflow.json``, so a resumed run logs into the same MLflow run), the run's settings as
  params, every metrics row as metrics at its step, and at the end ``OUT/model`` as the artifact folder ``model``;
  the run ends FINISHED, or FAILED when training raised. A killed run stays RUNNING until resumed. MLflow keeps
  every value logged: the steps a killed attempt logged past its checkpoint appear twice (the resumed run's value
  last).

Only the process with ``jax.process_index() == 0`` tracks.
"""
from __future__ import annotations

import json
import numbers
import os
import time
import warnings
from pathlib import Path

from flaxdet.config import ConfigError


def _numeric(rec):
    return {k: float(v) for k, v in rec.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "step"}


class TensorBoardLog:
    def __init__(self, out: Path, start: int):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ConfigError("TensorBoard logging needs tensorboardX (pip install tensorboardX), or turn it off "
                              "(--no-tensorboard)") from e
        self.dir = out / "tensorboard"
        # the file name holds the start time in whole seconds: a resumed attempt within the same second as the last
        # one would overwrite its file; the resumed step in the suffix keeps them apart, in order
        self.writer = SummaryWriter(logdir=str(self.dir), purge_step=start + 1 if start else None, flush_secs=30,
                                    filename_suffix=f".from{start:010d}")

    def log(self, rec):
        step = int(rec["step"])
        for k, v in _numeric(rec).items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def flush(self):
        self.writer.flush()

    def close(self, status="FINISHED"):
        self.writer.close()


class MLflowLog:
    def __init__(self, out: Path, uri: str, experiment: str, settings: dict, run_name=None, log=print):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ConfigError("--mlflow needs MLflow: pip install 'flaxdet[mlflow]' (mlflow-skinny)") from e
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless asked; a file: URI given to flaxdet is that request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        try:
            self._open(out, uri, experiment, settings, run_name, log, MlflowClient)
        except ConfigError:
            raise
        except Exception as e:  # MLflow's errors: a server that does not answer, a store it cannot use, ...
            raise ConfigError(f"--mlflow {uri}: {type(e).__name__}: {str(e)[:300]}") from e

    def _open(self, out, uri, experiment, settings, run_name, log, MlflowClient):  # noqa: N803
        self.client = MlflowClient(tracking_uri=uri)
        state_file = out / "mlflow.json"
        prev = None
        if state_file.is_file():
            try:
                prev = json.loads(state_file.read_text())
            except ValueError:
                prev = None
        run = None
        if isinstance(prev, dict) and prev.get("uri") == uri and prev.get("run_id"):
            try:
                run = self.client.get_run(prev["run_id"])
            except Exception:  # deleted, or another store: start a new run
                run = None
        if run is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=run_name or out.resolve().name,
                                         tags={"flaxdet.run_dir": str(out.resolve())})
            from mlflow.entities import Param

            params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in settings.items()]
            self.client.log_batch(run.info.run_id, params=params)
            log(f"MLflow: run {run.info.run_id} in experiment {experiment!r} at {uri}")
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            log(f"MLflow: continuing run {run.info.run_id} at {uri}")
        self.run_id = run.info.run_id
        tmp = state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(uri=uri, run_id=self.run_id, experiment=experiment)))
        tmp.replace(state_file)

    def log(self, rec):
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(rec["step"])
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in _numeric(rec).items()])
        except Exception as e:  # a tracking server's hiccup must not end the training (metrics.jsonl has it all)
            self._warn(f"MLflow: step {step} not logged ({type(e).__name__}: {str(e)[:200]})")

    def _warn(self, msg):
        if not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(msg + " (further MLflow errors not shown)", stacklevel=3)

    def flush(self):
        pass

    def artifacts(self, model_dir: Path):
        try:
            self.client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
        except Exception as e:
            self._warn(f"MLflow: {model_dir} not uploaded ({type(e).__name__}: {str(e)[:200]})")

    def close(self, status="FINISHED"):
        if status != "RUNNING":  # RUNNING: stopped before the end, resumed later
            self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """The run's trackers (none, TensorBoard, MLflow): ``log(rec)`` per step, ``flush()`` at checkpoints,
    ``finish(model_dir)`` once ``OUT/model`` is written, ``close(status)``."""

    def __init__(self, out, start, settings, tensorboard=True, mlflow_uri=None, mlflow_experiment="flaxdet",
                 log=print):
        out = Path(out)
        self.items = []
        if tensorboard:
            self.items.append(TensorBoardLog(out, start))
        if mlflow_uri:
            self.items.append(MLflowLog(out, mlflow_uri, mlflow_experiment, settings, log=log))

    def log(self, rec):
        for t in self.items:
            t.log(rec)

    def flush(self):
        for t in self.items:
            t.flush()

    def finish(self, model_dir):
        for t in self.items:
            if isinstance(t, MLflowLog):
                t.artifacts(Path(model_dir))

    def close(self, status="FINISHED"):
        for t in self.items:
            t.close(status)
        self.items = []
