"""`flaxdet train` / :func:`flaxdet.train`: fine-tune a converted model on COCO-format data, resumably, data-parallel.

* Optimizers as visdet defines them (:mod:`flaxdet.training.optimizers`). ``frozen_stages`` parameters get
  no update; BN trains as under visdet's ``model.train()`` (:mod:`flaxdet.training.step`: RTMDet's BN on batch
  statistics, the two-stage family's frozen by ``norm_eval``).
* Optional EMA of the weights (:mod:`flaxdet.training.ema`), used for the final ``model/`` when on.
* Input: the grain pipeline (:mod:`flaxdet.data.grain_pipeline`, worker processes) by default, or the
  single-thread :class:`flaxdet.data.coco.TrainLoader` (``loader="thread"``).
* Checkpoints (orbax) every ``ckpt_every`` steps, last ``keep`` kept: params, optimizer state, BN statistics (the
  non-parameter state), the EMA and the step (item ``default``), and the grain iterator's state (item ``data``,
  one file per process). Data order, flips and the sampler's PRNG key are pure functions of (seed, step), so a
  run killed at any point resumes from its last checkpoint with no lost or repeated step.
  ``OUT/run.json`` records the run's settings: a resume with other settings is refused unless ``force``.
* Data parallel: the global batch is sharded over all devices along a ``data`` mesh axis (``jax.sharding``),
  parameters replicated; one device works unchanged. Multi-process: call ``jax.distributed.initialize()`` first in
  every process; the mesh then spans all processes' devices, each process loads the rows of the global batch its
  devices hold and the global batch is assembled with ``jax.make_array_from_process_local_data``. Process 0
  writes ``run.json``, ``metrics.jsonl``, the trackers and ``model/``; every process takes part in checkpoints.
* Tracking (:mod:`flaxdet.training.tracking`): TensorBoard events in ``OUT/tensorboard`` by default, MLflow with
  ``mlflow=URI``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from flaxdet.checkpoint import load_model_dir, save_model_dir
from flaxdet.config import ConfigError, check_trainable, final_bbox_head, is_two_stage, test_scale
from flaxdet.data.coco import CocoDataset, TrainLoader
from flaxdet.data.grain_pipeline import warn_unreadable
from flaxdet.fast_paths import onednn
from flaxdet.models import build_detector
from flaxdet.training.ema import EMAConfig
from flaxdet.training.optimizers import DEFAULTS, make_optimizer
from flaxdet.training.step import TrainState
from flaxdet_converters.convert import export_visdet_state_dict, load_visdet_state_dict


def num_classes_of(model) -> int:
    return (final_bbox_head(model.cfg.roi_head) if is_two_stage(model.cfg) else model.cfg.bbox_head).num_classes


def adapt_num_classes(model, classes, log=print):
    """visdet's SimpleRunner sets the heads' num_classes from the annotation file; so do we:
    class-dependent layers (fc_cls, fc_reg unless class-agnostic, conv_logits; RTMDet: every level's
    ``rtm_cls``) are re-initialised, everything else kept. A Cascade R-CNN's heads are per-stage tuples: every
    stage is adapted."""
    n = len(classes)
    old = num_classes_of(model)
    if old == n:
        return model

    def with_classes(c):
        if c is None:
            return None
        return tuple(dataclasses.replace(h, num_classes=n) for h in c) if isinstance(c, tuple) else \
            dataclasses.replace(c, num_classes=n)

    if is_two_stage(model.cfg):
        rh = model.cfg.roi_head
        new_rh = dataclasses.replace(rh, bbox_head=with_classes(rh.bbox_head), mask_head=with_classes(rh.mask_head))
        new_cfg = dataclasses.replace(model.cfg, roi_head=new_rh)
    else:
        new_cfg = dataclasses.replace(model.cfg, bbox_head=with_classes(model.cfg.bbox_head))
    new = build_detector(new_cfg)
    rep = load_visdet_state_dict(new, export_visdet_state_dict(model), strict=False)
    remade = sorted({m.split(":")[0].rsplit(".", 1)[0] for m in rep.misshapen})
    _visdet_head_init(new, remade, seed=n)
    log(f"num_classes {old} -> {n} (from the dataset): re-initialised {len(rep.misshapen)} class-dependent "
        f"tensors of {remade}")
    return new


def bias_init_with_prob(prior_prob):
    """mmengine's ``bias_init_with_prob``: the bias whose sigmoid is ``prior_prob``."""
    return float(-np.log((1 - prior_prob) / prior_prob))


def _visdet_head_init(model, layers, seed=0):
    """visdet's init for the re-created ``layers`` (dotted module paths such as ``roi_head.bbox_head.fc_cls``,
    a cascade's ``roi_head.bbox_head.2.fc_cls`` or RTMDet's ``bbox_head.rtm_cls.0``): fc_cls N(0, 0.01), fc_reg
    N(0, 0.001), conv_logits Kaiming-normal (fan_out, relu), biases 0; rtm_cls N(0, 0.01) with the bias
    ``bias_init_with_prob(0.01)`` (RTMDetSepBNHead.init_weights)."""
    key = jax.random.PRNGKey(seed)
    for path in layers:
        layer = model
        for name in path.split("."):
            layer = layer[int(name)] if name.isdigit() else getattr(layer, name)
        w = layer.weight.get_value()
        names = path.split(".")
        kind = "rtm_cls" if "rtm_cls" in names else names[-1]
        bias = 0.0
        if kind == "conv_logits":
            std = float(np.sqrt(2.0 / (w.shape[0] * w.shape[1] * w.shape[3])))  # (kh, kw, in, out): fan_out
        elif kind in ("fc_cls", "fc_reg"):
            std = 0.01 if kind == "fc_cls" else 0.001
        elif kind == "rtm_cls":
            std, bias = 0.01, bias_init_with_prob(0.01)
        else:
            raise ValueError(f"unexpected class-dependent layer {path}")
        key, k = jax.random.split(key)
        layer.weight.set_value(std * jax.random.normal(k, w.shape, w.dtype))
        if layer.bias is not None:
            layer.bias.set_value(jnp.full_like(layer.bias.get_value(), bias))


def with_masks(model) -> bool:
    """The model trains a mask branch (Mask R-CNN's RoI head, RTMDet-Ins's head)."""
    return bool(model.roi_head.with_mask if is_two_stage(model.cfg) else model.with_mask)


def _mesh_and_shardings(num_devices):
    devs = jax.devices()  # every process's devices under jax.distributed
    if num_devices and jax.process_count() > 1 and num_devices != len(devs):
        raise ConfigError(f"--devices {num_devices}: a multi-process run uses all {len(devs)} devices of its "
                          f"{jax.process_count()} processes")
    devs = devs[: num_devices or len(devs)]
    mesh = jax.make_mesh((len(devs),), ("data",), axis_types=(AxisType.Auto,), devices=devs)
    return mesh, NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def process_rows(data_sharding, batch_size):
    """(row0, rows): the contiguous rows of the global batch this process's devices hold under
    ``data_sharding`` (all of them in a single-process run)."""
    spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                    for s in data_sharding.addressable_devices_indices_map((batch_size,)).values()})
    row0, row1 = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != row1 - row0 or (row1 - row0) * jax.process_count() != batch_size:
        raise ValueError(f"this process's devices hold rows {spans} of the batch of {batch_size}: not one "
                         "contiguous share")
    return row0, row1 - row0


def shard_batch(batch, data_sharding, global_batch=None):
    """Host arrays -> global arrays sharded along the batch. One process: ``batch`` is the global batch. Several:
    ``batch`` holds this process's rows (:func:`process_rows`) of a global batch of ``global_batch``
    (``jax.make_array_from_process_local_data``)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), data_sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v),
                                                      (global_batch,) + np.shape(v)[1:]) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What :func:`train` runs: the model, the data, the schedule and the run folder (``flaxdet train``'s
    options; see ``flaxdet train --help``)."""

    checkpoint: str | Path  # a flaxdet model dir (``flaxdet convert``) to fine-tune
    ann_file: str | Path  # COCO-format training annotations
    out_dir: str | Path  # run folder: checkpoints/, metrics.jsonl, loss_curve.png, model/ (resumed if present)
    img_dir: str | Path | None = None  # images folder (default: beside the annotation file)
    steps: int = 100
    batch_size: int = 2  # global batch, split over the devices
    scale: tuple | None = None  # keep-ratio resize bounds (long, short); default: the model's test scale
    optimizer: str = "adamw"  # "adamw" (visdet's runner default), "sgd" (visdet's 1x), "rtmdet_adamw" (upstream's)
    lr: float | None = None  # default: the optimizer's (0.02 sgd, 1e-4 adamw, 0.004 rtmdet_adamw)
    weight_decay: float | None = None  # default: the optimizer's (1e-4 sgd, 0.05 adamw and rtmdet_adamw)
    warmup_iters: int | None = None  # linear warm-up; default: the optimizer's (500 sgd, 0 adamw, 1000 rtmdet_adamw)
    milestones: tuple = (8, 11)  # sgd's x0.1 epochs
    ckpt_every: int = 50
    keep: int = 3  # checkpoints kept
    seed: int = 0  # data order, flips and sampling
    max_gt: int = 100  # GT boxes per image the static shapes hold
    num_devices: int | None = None  # data-parallel devices (default: all local)
    dtype: str | None = None  # compute dtype: None / "float32", or "bfloat16" (mixed precision)
    ema: bool = False  # keep an EMA of the weights (upstream RTMDet's ExpMomentumEMA); model/ gets the EMA weights
    ema_per_alias: bool = True  # EMA: lerp a shared tensor once per visdet key, as mmengine does (flaxdet.training.ema)
    force: bool = False  # resume even when the run's settings differ from OUT/run.json's
    loader: str = "grain"  # "grain" (worker processes, state in the checkpoints) or "thread" (one thread)
    workers: int | None = None  # grain worker processes (default: the cores less one, <= 16); 0: in this process
    tensorboard: bool = True  # TensorBoard event files in OUT/tensorboard
    mlflow: str | None = None  # MLflow tracking URI (file:..., http://...): params, metrics, model/ as an artifact
    mlflow_experiment: str = "flaxdet"  # the MLflow experiment's name
    remat: str = "auto"  # rematerialisation in the step: "none", "auto", "full" (memory vs time; same values)


class ResumeError(ConfigError):
    """A run folder's checkpoints were made with other settings."""


def run_settings(cfg: TrainConfig, scale) -> dict:
    """The settings a resumed run must share with the run it continues (defaults resolved)."""
    d_lr, d_wd, d_warm, _ = DEFAULTS[cfg.optimizer] if cfg.optimizer in DEFAULTS else (None,) * 4
    out = dict(checkpoint=str(Path(cfg.checkpoint).resolve()), ann_file=str(Path(cfg.ann_file).resolve()),
               img_dir=str(Path(cfg.img_dir).resolve()) if cfg.img_dir else None, batch_size=cfg.batch_size,
               scale=[int(v) for v in scale], optimizer=cfg.optimizer,
               lr=float(d_lr if cfg.lr is None else cfg.lr),
               weight_decay=float(d_wd if cfg.weight_decay is None else cfg.weight_decay),
               warmup_iters=int(d_warm if cfg.warmup_iters is None else cfg.warmup_iters), seed=cfg.seed,
               max_gt=cfg.max_gt, dtype=cfg.dtype or "float32", ema=cfg.ema,
               ema_per_alias=cfg.ema_per_alias if cfg.ema else None, loader=cfg.loader)
    if cfg.optimizer == "sgd":
        out["milestones"] = [int(m) for m in cfg.milestones]
    if cfg.optimizer == "rtmdet_adamw":  # its cosine spans the run's second half
        out["steps"] = cfg.steps
    return out


def check_resume_settings(out: Path, settings: dict, resuming: bool, force: bool, log=print, write=True):
    """Refuse (:class:`ResumeError`) to resume a run whose ``run.json`` settings differ, unless ``force``; write
    ``run.json`` for a new (or forced) run (``write``: process 0 of a multi-process run)."""
    path = out / "run.json"
    if resuming and path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict):
            old.setdefault("loader", "thread")  # runs from before the grain loader
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff and not force:
                what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *ab) for k, ab in diff.items()))
                raise ResumeError(f"{out} holds a run with other settings ({what}): resuming would mix two runs. "
                                  "Use the same settings, another --out, or --force to resume anyway")
            if diff:
                log(f"--force: resuming {out} with changed settings: {sorted(diff)}")
    elif resuming:
        log(f"{out}: no run.json (a run from an older flaxdet): its settings cannot be checked")
    if not write:
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(path)


def truncate_metrics(metrics_path: Path, upto: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to step ``upto`` (a resumed run rewrites the later ones: a killed
    attempt may have logged steps past its last checkpoint); drops lines cut short by a kill. Returns rows
    dropped."""
    if not metrics_path.exists():
        return 0
    kept, dropped = [], 0
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += bool(line.strip())
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= upto:
            kept.append(line)
        else:
            dropped += 1
    tmp = metrics_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    tmp.replace(metrics_path)
    return dropped


def _train_state_tree(state):
    tree = {"params": state.params, "opt_state": state.opt_state, "rest": state.rest}
    if state.ema is not None:
        tree["ema"] = state.ema.state()
    return tree


def _make_loader(cfg: TrainConfig, ds, scale, masks, row0):
    if cfg.loader == "grain":
        from flaxdet.data.grain_pipeline import GrainTrainLoader

        return GrainTrainLoader(ds, cfg.batch_size, scale, cfg.max_gt, cfg.seed, with_masks=masks,
                                workers=cfg.workers, num_steps=cfg.steps, process_count=jax.process_count(),
                                row0=row0)
    if cfg.loader == "thread":
        return TrainLoader(ds, cfg.batch_size, scale, cfg.max_gt, cfg.seed, with_masks=masks)
    raise ConfigError(f"loader {cfg.loader!r}: use 'grain' or 'thread'")


def _thread_batches(loader: TrainLoader, start, todo, row0, rows):
    """The thread loader's batches as (step, this process's rows of the batch, epoch, skipped, unreadable); it
    warns about unreadable images itself."""
    for step, batch, epoch in loader.batches(start, todo):
        if rows != loader.batch_size:  # multi-process: every process decodes the whole batch (use grain)
            batch = {k: v[row0:row0 + rows] for k, v in batch.items()}
        yield step, batch, epoch, len(loader.skipped.pop(step, [])), ()


def train(cfg: TrainConfig, *, progress=True, plot=True, log=print, stop_after=None):
    """Fine-tune ``cfg.checkpoint`` on ``cfg.ann_file``; returns (final model, list of metric dicts): the EMA
    model when ``cfg.ema``. ``stop_after`` ends the process's work after that many steps (as a kill would)
    without touching checkpoints -- for tests."""
    main = jax.process_index() == 0
    if not main:
        log = lambda *a, **k: None  # noqa: E731  (process 0 speaks for the run)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _, _ = load_model_dir(cfg.checkpoint)
    check_trainable(model.cfg, f"{cfg.checkpoint}/config.yaml")
    onednn.note_if_missing(log)
    ds = CocoDataset(cfg.ann_file, cfg.img_dir)
    model = adapt_num_classes(model, ds.classes, log)
    scale = tuple(cfg.scale) if cfg.scale is not None else test_scale(model.cfg)
    mesh, data_sh, repl_sh = _mesh_and_shardings(cfg.num_devices)
    if cfg.batch_size % mesh.size:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {mesh.size} devices")
    row0, rows = process_rows(data_sh, cfg.batch_size)
    loader = _make_loader(cfg, ds, scale, with_masks(model), row0)
    tx, sched = make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, loader.steps_per_epoch, cfg.warmup_iters,
                               cfg.milestones, total_steps=cfg.steps)
    ema_cfg = EMAConfig(per_alias=cfg.ema_per_alias) if cfg.ema else None
    state = TrainState(model, tx, dtype=cfg.dtype, ema=ema_cfg, remat=cfg.remat)
    state.params, state.opt_state, state.rest = jax.device_put((state.params, state.opt_state, state.rest), repl_sh)
    if state.ema is not None:
        state.ema.params, state.ema.rest = jax.device_put((state.ema.params, state.ema.rest), repl_sh)

    mgr = ocp.CheckpointManager((out / "checkpoints").absolute(), item_names=("default", "data"),
                                options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, save_interval_steps=1))
    start = mgr.latest_step() or 0
    settings = run_settings(cfg, scale)
    check_resume_settings(out, settings, start > 0, cfg.force, log, write=main)
    metrics_path = out / "metrics.jsonl"
    data_it = loader.iterator(start) if cfg.loader == "grain" else None
    if start:
        _restore(mgr, start, state, log)
        state.step = start
        state.needed_rows = _recent_mask_rows(metrics_path, start, state.MASK_ROWS_WINDOW)
        if data_it is not None:
            _restore_data(mgr, start, data_it, log)
        dropped = truncate_metrics(metrics_path, start) if main else 0
        log(f"resumed from step {start} ({out / 'checkpoints'})" +
            (f"; dropped {dropped} metrics rows past it" if dropped else ""))
    elif metrics_path.exists() and main:
        metrics_path.unlink()
    history = []
    base_key = jax.random.PRNGKey(cfg.seed)
    todo = max(0, cfg.steps - start) if stop_after is None else max(0, min(cfg.steps, start + stop_after) - start)
    if data_it is not None:
        batches = (next(data_it) for _ in range(todo))
    else:
        batches = _thread_batches(loader, start, todo, row0, rows)
    trackers = None
    if main:
        from flaxdet.training.tracking import Trackers

        trackers = Trackers(out, start, settings, cfg.tensorboard, cfg.mlflow, cfg.mlflow_experiment, log)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    t_last = time.perf_counter()
    skipped_total, unreadable_seen = 0, set()
    status = "FAILED"
    try:
        with open(metrics_path, "a") if main else contextlib.nullcontext() as mf:
            for step, batch, epoch, skipped, unreadable in batches:
                if unreadable:  # grain: warned here, once per file
                    warn_unreadable(unreadable, unreadable_seen)
                key = jax.random.fold_in(base_key, step)
                logs = state.train_step(shard_batch(batch, data_sh, cfg.batch_size), key)
                logs = {k: float(v) for k, v in jax.device_get(logs).items()}
                now = time.perf_counter()
                rec = dict(step=step + 1, epoch=epoch, lr=float(sched(step)), **logs,
                           images_per_s=cfg.batch_size / max(now - t_last, 1e-9))
                if state.last_mask_rows is not None:  # the mask branch's row bucket (see TrainState.train_step)
                    rec.update(mask_rows=state.last_mask_rows, mask_rows_needed=state.needed_rows[-1])
                if skipped:  # unreadable images this step (their slots taken by readable ones)
                    rec["skipped_images"] = skipped
                    skipped_total += skipped
                t_last = now
                history.append(rec)
                if main:
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                    trackers.log(rec)
                if not np.isfinite(logs["loss"]):
                    raise FloatingPointError(f"loss is {logs['loss']} at step {step + 1}; stopping (last good "
                                             f"checkpoint: {mgr.latest_step()})")
                bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss")} |
                                {"img/s": f"{rec['images_per_s']:.1f}"})
                bar.update(1)
                if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                    items = dict(default=ocp.args.StandardSave(_train_state_tree(state)))
                    if data_it is not None:
                        import grain

                        items["data"] = grain.checkpoint.CheckpointSave(data_it)
                    mgr.save(step + 1, args=ocp.args.Composite(**items))
                    mgr.wait_until_finished()
                    if trackers is not None:
                        trackers.flush()
        bar.close()
        mgr.close()
        if state.reruns:
            log(f"{state.reruns} step(s) re-run: their positives needed more mask rows than recent steps had")
        if skipped_total:
            log(f"{skipped_total} unreadable training image(s) skipped (see the warnings; metrics: skipped_images)")
        final = state.ema_model() if state.ema is not None else state.model()
        if state.step >= cfg.steps and main:
            meta = dict(trained_steps=state.step, source=str(cfg.checkpoint), category_ids=list(ds.cat_ids))
            if state.ema is not None:
                meta["weights"] = (f"EMA (ExpMomentumEMA momentum {state.ema.cfg.momentum}, gamma "
                                   f"{state.ema.cfg.gamma}, per_alias {state.ema.cfg.per_alias}; {state.ema.steps} "
                                   "updates)")
            save_model_dir(out / "model", final, ds.classes, meta, overwrite=True)
            if plot and history:
                plot_losses(metrics_path, out / "loss_curve.png")
            trackers.finish(out / "model")
        status = "FINISHED" if state.step >= cfg.steps else "RUNNING"
    finally:
        if data_it is not None:
            data_it.close()
        if trackers is not None:
            trackers.close(status)  # RUNNING: stopped early (stop_after), the run goes on when resumed
    return final, history


def _restore_data(mgr, step, data_it, log):
    """Put the grain iterator where checkpoint ``step`` left it (its saved state), or at ``step`` when the
    checkpoint has none (saved by the thread loader or an older flaxdet: the same batches, rebuilt)."""
    import grain

    ckpt = Path(mgr.directory) / str(step)
    if not (ckpt / "data").is_dir():
        log(f"checkpoint {step} holds no data-pipeline state: the grain pipeline starts at step {step}")
        return
    mgr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_it)))
    if data_it.next_step != step:
        raise ResumeError(f"checkpoint {step}: its data-pipeline state is at step {data_it.next_step}")


def _restore(mgr, step, state, log):
    """Restore params, optimizer state, BN statistics and the EMA of checkpoint ``step`` into ``state``
    (shardings from ``state``'s arrays). A checkpoint from before the BN statistics were saved (two-stage runs:
    its BN never moved) restores params and optimizer state only."""
    target = _train_state_tree(state)
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(default=ocp.args.StandardRestore(target)))["default"]
    except (KeyError, ValueError, FileNotFoundError) as e:
        if state.train_bn or state.ema is not None:
            raise ResumeError(f"checkpoint {step} lacks the BN statistics or EMA this run needs ({e})") from e
        restored = mgr.restore(step, args=ocp.args.Composite(default=ocp.args.StandardRestore(
            {"params": state.params, "opt_state": state.opt_state})))["default"]
        log(f"checkpoint {step}: params and optimizer state only (an older flaxdet's checkpoint)")
    state.params, state.opt_state = restored["params"], restored["opt_state"]
    if "rest" in restored:
        state.rest = restored["rest"]
    if state.ema is not None:
        state.ema.load_state(restored["ema"])


def _recent_mask_rows(metrics_path, upto, window):
    """The mask rows the last ``window`` steps up to ``upto`` needed, from the run's metrics: a resumed
    run picks the mask branch's rows as the uninterrupted one did (same shapes, same floats)."""
    if not Path(metrics_path).exists():
        return []
    by_step = {}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if isinstance(rec, dict) and "mask_rows_needed" in rec and rec.get("step", upto + 1) <= upto:
            by_step[rec["step"]] = int(rec["mask_rows_needed"])
    return [by_step[k] for k in sorted(by_step)][-window:]


def plot_losses(metrics_path, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in sorted(recs[0]):
        if k.startswith("loss"):
            ax.plot([r["step"] for r in recs], [r[k] for r in recs], label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("flaxdet fine-tuning")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
