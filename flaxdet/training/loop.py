"""`flaxdet train` / :func:`flaxdet.train`: fine-tune a converted model on COCO-format data, resumably, data-parallel.

* Optimizers as visdet defines them (:mod:`flaxdet.training.optimizers`). ``frozen_stages`` parameters get
  no update; BN statistics never move.
* Checkpoints (orbax) every ``ckpt_every`` steps, last ``keep`` kept: params, optimizer state and the
  step. Data order, flips and the sampler's PRNG key are pure functions of (seed, step), so a run
  killed at any point resumes from its last checkpoint with no lost or repeated step.
* Data parallel: the global batch is sharded over all local devices along a ``data`` mesh axis
  (``jax.sharding``), parameters replicated; one device works unchanged. Multi-host: call
  ``jax.distributed.initialize()`` first in every process; the mesh then spans all processes' devices
  and each process feeds its share of the global batch.
"""
from __future__ import annotations

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
from flaxdet.config import check_trainable, final_bbox_head
from flaxdet.data.coco import CocoDataset, TrainLoader
from flaxdet.models import build_detector
from flaxdet.training.optimizers import make_optimizer
from flaxdet.training.step import TrainState
from flaxdet_converters.convert import export_visdet_state_dict, load_visdet_state_dict


def adapt_num_classes(model, classes, log=print):
    """visdet's SimpleRunner sets the heads' num_classes from the annotation file; so do we:
    class-dependent layers (fc_cls, fc_reg unless class-agnostic, conv_logits) are re-initialised,
    everything else kept. A Cascade R-CNN's heads are per-stage tuples: every stage is adapted."""
    n = len(classes)
    rh = model.cfg.roi_head
    old = final_bbox_head(rh).num_classes
    if old == n:
        return model

    def with_classes(c):
        if c is None:
            return None
        return tuple(dataclasses.replace(h, num_classes=n) for h in c) if isinstance(c, tuple) else \
            dataclasses.replace(c, num_classes=n)

    new_rh = dataclasses.replace(rh, bbox_head=with_classes(rh.bbox_head), mask_head=with_classes(rh.mask_head))
    new = build_detector(dataclasses.replace(model.cfg, roi_head=new_rh))
    rep = load_visdet_state_dict(new, export_visdet_state_dict(model), strict=False)
    remade = sorted({m.split(":")[0].rsplit(".", 1)[0] for m in rep.misshapen})
    _visdet_head_init(new, remade, seed=n)
    log(f"num_classes {old} -> {n} (from the dataset): re-initialised {len(rep.misshapen)} class-dependent "
        f"tensors of {remade}")
    return new


def _visdet_head_init(model, layers, seed=0):
    """visdet's init for the re-created ``layers`` (dotted module paths such as ``roi_head.bbox_head.fc_cls``
    or a cascade's ``roi_head.bbox_head.2.fc_cls``): fc_cls N(0, 0.01), fc_reg N(0, 0.001), conv_logits
    Kaiming-normal (fan_out, relu); biases 0."""
    key = jax.random.PRNGKey(seed)
    for path in layers:
        layer = model
        for name in path.split("."):
            layer = layer[int(name)] if name.isdigit() else getattr(layer, name)
        w = layer.weight.get_value()
        kind = path.rsplit(".", 1)[-1]
        if kind == "conv_logits":
            std = float(np.sqrt(2.0 / (w.shape[0] * w.shape[1] * w.shape[3])))  # (kh, kw, in, out): fan_out
        elif kind in ("fc_cls", "fc_reg"):
            std = 0.01 if kind == "fc_cls" else 0.001
        else:
            raise ValueError(f"unexpected class-dependent layer {path}")
        key, k = jax.random.split(key)
        layer.weight.set_value(std * jax.random.normal(k, w.shape, w.dtype))
        if layer.bias is not None:
            layer.bias.set_value(jnp.zeros_like(layer.bias.get_value()))


def _mesh_and_shardings(num_devices):
    devs = jax.devices()[: num_devices or len(jax.devices())]
    mesh = jax.make_mesh((len(devs),), ("data",), axis_types=(AxisType.Auto,), devices=devs)
    return mesh, NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def shard_batch(batch, data_sharding):
    return {k: jax.device_put(np.asarray(v), data_sharding) for k, v in batch.items()}


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
    scale: tuple = (1333, 800)  # keep-ratio resize bounds (long, short), as visdet's Resize
    optimizer: str = "adamw"  # "adamw" (visdet's runner default) or "sgd" (visdet's 1x schedule)
    lr: float | None = None  # default: the optimizer's (0.02 sgd, 1e-4 adamw)
    weight_decay: float | None = None  # default: the optimizer's (1e-4 sgd, 0.05 adamw)
    warmup_iters: int = 500  # sgd's linear warm-up
    milestones: tuple = (8, 11)  # sgd's x0.1 epochs
    ckpt_every: int = 50
    keep: int = 3  # checkpoints kept
    seed: int = 0  # data order, flips and sampling
    max_gt: int = 100  # GT boxes per image the static shapes hold
    num_devices: int | None = None  # data-parallel devices (default: all local)
    dtype: str | None = None  # compute dtype: None / "float32", or "bfloat16" (mixed precision)


def train(cfg: TrainConfig, *, progress=True, plot=True, log=print, stop_after=None):
    """Fine-tune ``cfg.checkpoint`` on ``cfg.ann_file``; returns (final model, list of metric dicts).
    ``stop_after`` ends the process's work after that many steps (as a kill would) without touching
    checkpoints -- for tests."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _, _ = load_model_dir(cfg.checkpoint)
    check_trainable(model.cfg, f"{cfg.checkpoint}/config.yaml")
    ds = CocoDataset(cfg.ann_file, cfg.img_dir)
    model = adapt_num_classes(model, ds.classes, log)
    with_masks = model.roi_head.with_mask
    loader = TrainLoader(ds, cfg.batch_size, cfg.scale, cfg.max_gt, cfg.seed, with_masks=with_masks)
    tx, sched = make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, loader.steps_per_epoch, cfg.warmup_iters,
                               cfg.milestones)
    state = TrainState(model, tx, dtype=cfg.dtype)
    mesh, data_sh, repl_sh = _mesh_and_shardings(cfg.num_devices)
    if cfg.batch_size % mesh.size:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {mesh.size} devices")
    state.params, state.opt_state, state.rest = jax.device_put((state.params, state.opt_state, state.rest), repl_sh)

    mgr = ocp.CheckpointManager((out / "checkpoints").absolute(),
                                options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, save_interval_steps=1))
    start = 0
    if mgr.latest_step() is not None:
        start = mgr.latest_step()
        target = {"params": state.params, "opt_state": state.opt_state}
        restored = mgr.restore(start, args=ocp.args.StandardRestore(target))
        state.params, state.opt_state = restored["params"], restored["opt_state"]
        state.step = start
        state.needed_rows = _recent_mask_rows(out / "metrics.jsonl", start, state.MASK_ROWS_WINDOW)
        log(f"resumed from step {start} ({out / 'checkpoints'})")
    metrics_path = out / "metrics.jsonl"
    if start == 0 and metrics_path.exists():
        metrics_path.unlink()
    history = []
    base_key = jax.random.PRNGKey(cfg.seed)
    todo = max(0, cfg.steps - start) if stop_after is None else max(0, min(cfg.steps, start + stop_after) - start)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress)
    t_last = time.perf_counter()
    with open(metrics_path, "a") as mf:
        for step, batch, epoch in loader.batches(start, todo):
            key = jax.random.fold_in(base_key, step)
            logs = state.train_step(shard_batch(batch, data_sh), key)
            logs = {k: float(v) for k, v in jax.device_get(logs).items()}
            now = time.perf_counter()
            rec = dict(step=step + 1, epoch=epoch, lr=float(sched(step)), **logs,
                       images_per_s=cfg.batch_size / max(now - t_last, 1e-9))
            if state.last_mask_rows is not None:  # the mask branch's row bucket (see TrainState.train_step)
                rec.update(mask_rows=state.last_mask_rows, mask_rows_needed=state.needed_rows[-1])
            t_last = now
            history.append(rec)
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            if not np.isfinite(logs["loss"]):
                raise FloatingPointError(f"loss is {logs['loss']} at step {step + 1}; stopping (last good "
                                         f"checkpoint: {mgr.latest_step()})")
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss")} |
                            {"img/s": f"{rec['images_per_s']:.1f}"})
            bar.update(1)
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                mgr.save(step + 1, args=ocp.args.StandardSave({"params": state.params, "opt_state": state.opt_state}))
                mgr.wait_until_finished()
    bar.close()
    mgr.close()
    if state.reruns:
        log(f"{state.reruns} step(s) re-run: their positives needed more mask rows than recent steps had")
    final = state.model()
    if state.step >= cfg.steps:
        save_model_dir(out / "model", final, ds.classes, dict(trained_steps=state.step, source=str(cfg.checkpoint)),
                       overwrite=True)
        if plot and history:
            plot_losses(metrics_path, out / "loss_curve.png")
    return final, history


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
