"""A converted flaxdet model on disk: a directory that carries everything needed to use it.

    DIR/
      config.yaml          the model config in visdet's YAML schema (so it can go back to visdet)
      meta.json            class names, source checkpoint, key order, conversion report, format; optional:
                           source_dtypes ({key: dtype} the source stored other than float32: export restores
                           them), category_ids (the training set's COCO category id of each class, in label
                           order: infer writes them as category_id; 0-based labels without)
      params/              orbax checkpoint of the model's variables   (format "orbax", default)
      model.safetensors    flat file, visdet key names, torch layouts  (format "safetensors")

Writes are atomic: everything is written into a temporary sibling directory which replaces DIR
only when complete, so an interrupted or failed write never leaves a half-written model and
never destroys an existing one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from flaxdet.config import dump_yaml, load_config
from flaxdet.models import build_detector
from flaxdet_converters.checkpoint_io import load_checkpoint, save_checkpoint
from flaxdet_converters.convert import export_visdet_state_dict, flax_variables, load_visdet_state_dict

FORMATS = ("orbax", "safetensors")


class ModelDirError(ValueError):
    pass


def _live_variables(model):
    return {key: var for key, var, _ in flax_variables(model)}


def _flat_state(model):
    """{visdet key: array in flax layout} -- the orbax tree (keys are the visdet names)."""
    return {k: np.asarray(v.get_value()) for k, v in _live_variables(model).items()}


def is_model_dir(path) -> bool:
    """``path`` is a directory :func:`save_model_dir` wrote (config.yaml + a meta.json naming flaxdet's version)."""
    p = Path(path)
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (p / "config.yaml").is_file() and isinstance(meta, dict) and "flaxdet_version" in meta


def check_writable_dir(out, what="--out") -> Path:
    """A directory path we can create (or write in): not an existing file, not under a file, in a writable folder.
    Raises ModelDirError naming the problem; returns the path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelDirError(f"{what} {out} is an existing file, not a directory; give a directory path")
    a = out
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise ModelDirError(f"{what} {out}: {a} is a file, so no directory can be made under it; give another path")
    if not os.access(a, os.W_OK | os.X_OK):
        raise ModelDirError(f"{what} {out}: cannot write in {a} (permission denied); give another path")
    return out


def check_model_dir_target(out, overwrite=False, what="--out") -> Path:
    """Where :func:`save_model_dir` may write: a new or empty directory, or -- with ``overwrite`` -- an existing flaxdet
    model directory (never another non-empty directory, nor the current directory or one holding it)."""
    out = check_writable_dir(out, what)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ModelDirError(f"{out} exists and is not empty (use --overwrite to replace a flaxdet model directory)")
        if not is_model_dir(out):
            raise ModelDirError(f"{out} exists and is not a flaxdet model directory (no meta.json/config.yaml written "
                                "by flaxdet); --overwrite only replaces a model directory: give another --out")
        here, target = Path.cwd().resolve(), out.resolve()
        if target == here or target in here.parents:
            raise ModelDirError(f"{out} is the current directory or holds it; refusing to replace it: give another "
                                "--out (or run from elsewhere)")
    return out


def _this_process_only():
    """orbax options for a save by this process alone (a model directory is written by one process: in a
    multi-process training run, process 0; the arrays are host copies): no barrier with the other processes."""
    import jax

    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


def save_model_dir(out_dir, model, classes=None, meta=None, fmt="orbax", overwrite=False):
    """Write ``model`` (+ its config and class names) to ``out_dir`` atomically. ``overwrite`` replaces an existing
    flaxdet model directory (only that: see :func:`check_model_dir_target`)."""
    if fmt not in FORMATS:
        raise ModelDirError(f"unknown format {fmt!r} (choose from {FORMATS})")
    out = Path(os.path.abspath(check_model_dir_target(out_dir, overwrite)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.yaml").write_text(dump_yaml(model.cfg))
        info = dict(meta or {}, classes=list(classes) if classes is not None else None, format=fmt,
                    flaxdet_version=__import__("flaxdet").__version__)
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))
        if fmt == "orbax":
            with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
                ckptr.save((tmp / "params").absolute(), _flat_state(model))
        else:
            save_checkpoint(tmp / "model.safetensors", export_visdet_state_dict(model, info.get("key_order")))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model_dir(path, seed=0):
    """Returns (model, classes, meta) from a directory written by :func:`save_model_dir`."""
    p = Path(path)
    if not (p / "config.yaml").is_file() or not (p / "meta.json").is_file():
        raise ModelDirError(f"{p} is not a flaxdet model directory (no config.yaml/meta.json); "
                            "create one with `flaxdet convert`")
    meta = json.loads((p / "meta.json").read_text())
    model = build_detector(load_config(p / "config.yaml"), seed)
    if meta.get("format") == "safetensors":
        load_visdet_state_dict(model, load_checkpoint(p / "model.safetensors").state_dict)
    else:
        target = _flat_state(model)
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore((p / "params").absolute(), target)
        missing = sorted(set(target) - set(restored))
        if missing:
            raise ModelDirError(f"{p}/params lacks {len(missing)} variables, e.g. {missing[:3]}")
        live = _live_variables(model)
        for key, arr in restored.items():
            var = live[key]
            if tuple(arr.shape) != tuple(var.get_value().shape):
                raise ModelDirError(f"{p}: {key} has shape {arr.shape}, model expects {var.get_value().shape}")
            var.set_value(np.asarray(arr))
    return model, meta.get("classes"), meta
