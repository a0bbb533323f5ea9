"""flaxdet command line: convert a visdet checkpoint, prove parity, run inference, go back to visdet."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DESCRIPTION = """\
flaxdet: a weight-compatible JAX/Flax port of visdet (MMDetection 3.x fork).

Typical session:
  flaxdet presets                                              # models flaxdet knows
  flaxdet convert epoch_12.pth --config mask_rcnn_r50 --out model/
  flaxdet parity --config mask_rcnn_r50 --checkpoint epoch_12.pth --image photo.jpg
  flaxdet infer --checkpoint model/ --images photos/*.jpg --out detections/
  flaxdet train --checkpoint model/ --ann train.json --out run/ --steps 2000
  flaxdet eval --checkpoint run/model --ann val.json
  flaxdet export run/model --out back_to_visdet.pth

--config takes a preset name (see `flaxdet presets`) or a visdet YAML model file. A checkpoint
written by visdet's runner carries its config (meta.cfg), so --config may be omitted for those.

Compiled XLA programs are cached on disk (~/.cache/flaxdet/xla, or $XDG_CACHE_HOME/flaxdet/xla), so a
shape bucket compiles once per machine, not once per run; FLAXDET_COMPILE_CACHE=0 turns that off, and
JAX_COMPILATION_CACHE_DIR picks another directory.
"""


DTYPES = ("float32", "bfloat16")
DTYPE_HELP = ("compute dtype: float32 (default, visdet's numerics) or bfloat16 (mixed precision: convolutions and "
              "matmuls in bf16 with float32 accumulation; BN, softmax, box decoding, NMS, RoIAlign in float32).")


def enable_compile_cache():
    """Point JAX's persistent compilation cache at ~/.cache/flaxdet/xla unless the user chose otherwise
    (JAX_COMPILATION_CACHE_DIR) or opted out (FLAXDET_COMPILE_CACHE=0). Returns the directory or None."""
    if os.environ.get("FLAXDET_COMPILE_CACHE", "1") == "0":
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # JAX reads it itself
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    import jax

    d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flaxdet" / "xla"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(d))
    # every compile, also the many small ones of a model's random init (each under JAX's default 1 s
    # threshold; together ~12 s of an RTMDet-tiny CLI run on 2 cores)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return str(d)


NUM_CLASSES_HELP = ("RTMDet: the head's class count, which visdet's presets leave out (default: read from the "
                    "checkpoint's bbox_head.rtm_cls; given, it must agree with the checkpoint)")
SCALE_HELP = ("keep-ratio resize bounds (default: the model's test pipeline: 1333 800 for the two-stage "
              "family, the preset's img_scale, 640 640, for RTMDet)")


class UsageError(ValueError):
    """A command-line value out of range: one error line, exit 2."""


def _scale(values):
    if values is None:
        return None
    try:
        scale = tuple(int(v) for v in values)
    except ValueError:
        scale = ()
    if len(scale) != 2 or min(scale) < 1:
        raise UsageError(f"--scale takes two positive integers LONG SHORT (e.g. 1333 800), got {' '.join(values)[:60]}")
    return scale


def build_parser():
    p = argparse.ArgumentParser(prog="flaxdet", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also accepted after the command; FLAXDET_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("presets", help="list the model presets flaxdet ships")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("convert", help="visdet/MMDetection checkpoint -> flaxdet model directory",
                       description="Convert a visdet (or MMDetection 3.x) checkpoint -- raw state_dict .pth, "
                       "runner checkpoint .pth, or .safetensors -- into a flaxdet model directory (orbax "
                       "params + config.yaml + meta.json with class names and a full key report). Every "
                       "checkpoint key must be used exactly once and every model variable filled; "
                       "otherwise nothing is written.")
    s.add_argument("checkpoint", help="visdet checkpoint file (.pth or .safetensors)")
    s.add_argument("--config", help="preset name or visdet YAML (optional for runner checkpoints)")
    s.add_argument("--num-classes", type=int, help=NUM_CLASSES_HELP)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--format", choices=("orbax", "safetensors"), default="orbax",
                   help="params as an orbax checkpoint (default) or one flat .safetensors file")
    s.add_argument("--no-strict", action="store_true", help="convert what fits; report the rest")
    s.add_argument("--key-dialect", choices=("visdet", "mmdet", "swin"), default="visdet",
                   help="'mmdet' accepts upstream MMDetection-3.x key spellings (e.g. Swin patch_embed.projection); "
                   "'swin' reads an official (Microsoft) Swin backbone checkpoint (layers.N.blocks...; backbone "
                   "only: use with --no-strict)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing flaxdet model directory (no other directory is replaced)")
    s.add_argument("--classes", nargs="+", metavar="NAME",
                   help="class names to store, in label order, instead of the checkpoint's meta.dataset_meta.classes")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="flaxdet model directory -> visdet checkpoint, or a StableHLO artifact",
                       description="Write a flaxdet model back as a visdet checkpoint: .pth (runner-style, "
                       "with meta.dataset_meta.classes) or .safetensors. Keys, layouts and dtypes are visdet's; "
                       "a visdet -> flaxdet -> visdet round trip is bit-identical. With --format stablehlo: a "
                       "deployable artifact directory instead -- the jitted predict of one input shape bucket "
                       "serialized with jax.export, the weights, a manifest (input layout, preprocessing "
                       "constants, class names, category ids) and run_artifact.py, a loader that needs only jax "
                       "and numpy (and OpenCV for images).")
    s.add_argument("model_dir")
    s.add_argument("--out", required=True,
                   help="output .pth or .safetensors; with --format stablehlo, the artifact directory")
    s.add_argument("--key-dialect", choices=("visdet", "mmdet"), default="visdet",
                   help="key spelling: visdet's (default) or upstream MMDetection 3.x's (RTMDet: depthwise_conv / "
                   "pointwise_conv)")
    s.add_argument("--format", choices=("visdet", "stablehlo"), default="visdet",
                   help="visdet (default): a checkpoint, .pth or .safetensors by --out's suffix; stablehlo: a "
                   "jax.export artifact (needs --shape)")
    s.add_argument("--shape", metavar="HxW",
                   help="stablehlo: the padded network input, a multiple of the model's pad divisor (32), e.g. "
                   "800x1088 for 480x640 photos at the test scale 1333x800")
    s.add_argument("--batch", type=int, default=1, help="stablehlo: images per call (default 1)")
    s.add_argument("--canvas", metavar="HxW",
                   help="stablehlo, mask models: the largest original image the masks are pasted on (default: "
                   "--shape rounded up to 256)")
    s.add_argument("--scale", nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="stablehlo: the keep-ratio resize the loader applies (default: the model's test pipeline, "
                   "as flaxdet infer)")
    s.add_argument("--overwrite", action="store_true", help="stablehlo: replace an existing artifact directory")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("parity", help="per-stage comparison of flaxdet against PyTorch on an image",
                       description="Run the same checkpoint through flaxdet (jit) and through PyTorch "
                       "(reference/: flaxdet's mirror of visdet, or your installed visdet) on one image with "
                       "visdet's test pipeline, and compare every stage: backbone, FPN, RPN, proposals, RoI "
                       "features, heads, detections and masks. Prints a table, writes parity.json and "
                       "parity.png, exits 1 if any stage is outside its tolerance.")
    s.add_argument("--config", help="preset name or visdet YAML (optional for runner checkpoints)")
    s.add_argument("--num-classes", type=int, help=NUM_CLASSES_HELP)
    s.add_argument("--checkpoint", required=True, help="visdet checkpoint file")
    s.add_argument("--image", required=True)
    s.add_argument("--against", choices=("reference", "visdet"), default="reference")
    s.add_argument("--out", default="parity_out", help="directory for parity.json / parity.png")
    s.add_argument("--scale", nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help=SCALE_HELP)
    s.set_defaults(func=cmd_parity)

    s = sub.add_parser("infer", help="detect on images: COCO-format JSON + overlay PNGs",
                       description="Run a flaxdet model (a directory from `flaxdet convert`, or a visdet "
                       "checkpoint with --config) on image files with visdet's test pipeline. Pipelined: "
                       "background threads decode and resize ahead, images are batched by padded shape "
                       "(--batch-size per batch), and the model runs while earlier results are written; "
                       "results keep the input order.")
    s.add_argument("--checkpoint", required=True, help="flaxdet model directory or visdet checkpoint")
    s.add_argument("--config", help="needed only for a visdet checkpoint without meta.cfg")
    s.add_argument("--num-classes", type=int, help=NUM_CLASSES_HELP)
    s.add_argument("--images", nargs="+", required=True,
                   help="image files, folders (their image files, sorted) or quoted glob patterns ('photos/*.jpg')")
    s.add_argument("--out", required=True)
    s.add_argument("--scale", nargs=2, default=None, metavar=("LONG", "SHORT"), help=SCALE_HELP)
    s.add_argument("--score-thr", type=float, default=0.3, help="overlay threshold (JSON keeps all)")
    s.add_argument("--batch-size", type=int, default=1,
                   help="images per batch, all of one padded shape (1: each image alone, as visdet tests; on "
                   "CPU a batch gives each image the detections it gets alone; each new batch size compiles once "
                   "per shape)")
    s.add_argument("--workers", type=int, default=2, help="threads decoding and resizing images ahead")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--bucket", choices=("exact", "coarse"), default="exact",
                   help="exact: pad like visdet (multiple of 32); coarse: multiple of 128, fewer recompiles")
    s.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    s.set_defaults(func=cmd_infer)

    s = sub.add_parser("train", help="fine-tune a flaxdet model on COCO-format data",
                       description="Fine-tune a converted model (a directory from `flaxdet convert`) on a COCO "
                       "instances file with visdet's train pipeline (keep-ratio resize, random flip; GT boxes and "
                       "masks are resized with the image -- visdet's training Resize forgets to, flaxdet does "
                       "not). Resumable: re-running the same command continues from the last checkpoint in OUT. "
                       "Uses every local device (data parallel). Writes OUT/metrics.jsonl, OUT/loss_curve.png, "
                       "OUT/checkpoints/ and, at the end, OUT/model (usable by infer/eval/export).")
    s.add_argument("--checkpoint", required=True, help="flaxdet model directory to start from")
    s.add_argument("--ann", required=True, help="COCO instances JSON")
    s.add_argument("--images", help="image folder (default: <ann dir>/images)")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--batch-size", type=int, default=2, help="global batch (split over devices)")
    s.add_argument("--scale", nargs=2, default=None, metavar=("LONG", "SHORT"), help=SCALE_HELP)
    s.add_argument("--optimizer", choices=("sgd", "adamw", "rtmdet_adamw"), default="adamw",
                   help="adamw: visdet's runner default, for every model (lr 1e-4, wd 0.05, constant); sgd: the 1x "
                   "schedule (lr 0.02 for batch 16, momentum 0.9, wd 1e-4, warm-up 500 it, x0.1 at epochs 8 and "
                   "11); rtmdet_adamw: upstream MMDetection's RTMDet recipe (lr 0.004, wd 0.05 but none on norms "
                   "and biases, warm-up from 1e-5 over 1000 it, cosine to 0.05 lr over the second half of --steps)")
    s.add_argument("--lr", type=float, help="base learning rate (default per optimizer)")
    s.add_argument("--weight-decay", type=float)
    s.add_argument("--warmup-iters", type=int, default=None,
                   help="linear warm-up iterations, every optimizer (default: 500 sgd, 0 adamw, 1000 rtmdet_adamw; "
                   "from 0.001 x lr, rtmdet_adamw from 1e-5 x lr)")
    s.add_argument("--ema", action="store_true",
                   help="keep an EMA of the weights (upstream RTMDet's ExpMomentumEMA: momentum 2e-4, gamma 2000, BN "
                   "statistics included) and write it as OUT/model")
    s.add_argument("--ema-once-per-tensor", action="store_true",
                   help="EMA: lerp a shared tensor once per update (default: once per visdet key naming it, as "
                   "mmengine does: RTMDet's shared head convs move 1-(1-m)^3)")
    s.add_argument("--force", action="store_true",
                   help="resume OUT even when this run's settings differ from those recorded in OUT/run.json")
    s.add_argument("--ckpt-every", type=int, default=100)
    s.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-gt", type=int, default=100, help="GT boxes per image (static capacity)")
    s.add_argument("--devices", type=int, help="number of local devices to use (default all)")
    s.add_argument("--loader", choices=("grain", "thread"), default="grain",
                   help="grain (default): the train pipeline in --workers processes, its position saved in the "
                   "checkpoints; thread: one background thread in this process")
    s.add_argument("--workers", type=int, default=None,
                   help="grain worker processes (default: the cores less one, at most 16; 0: in this process)")
    s.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files (OUT/tensorboard)")
    s.add_argument("--mlflow", metavar="URI",
                   help="also track the run in MLflow at URI (file:/path/mlruns, http://host:5000, ...): the settings "
                   "as params, per-step metrics, OUT/model as an artifact (needs the mlflow extra)")
    s.add_argument("--mlflow-experiment", default="flaxdet", help="MLflow experiment name (default flaxdet)")
    s.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-process training: process 0's address (jax.distributed.initialize); run the same "
                   "command in every process with its --process-id; each loads its share of the global batch")
    s.add_argument("--num-processes", type=int, help="multi-process training: the number of processes")
    s.add_argument("--process-id", type=int, help="multi-process training: this process's index (0 .. N-1)")
    s.add_argument("--distributed", action="store_true",
                   help="multi-process training on a cluster JAX detects by itself (TPU pods, SLURM, ...): "
                   "jax.distributed.initialize() with no arguments")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--dtype", choices=DTYPES, default="float32",
                   help=DTYPE_HELP + " Parameters, gradients and optimizer state stay float32.")
    s.add_argument("--remat", choices=("none", "auto", "full"), default="auto",
                   help="rematerialisation in the train step: recompute activations in the backward instead of "
                   "keeping them (none: keep all, fastest, most memory; full: every backbone block, the neck and "
                   "the heads; auto (default): the per-backend choice of docs/performance.md -- on CPU nothing, which "
                   "saves no memory there). Same losses and gradients in every mode")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="COCO bbox/segm mAP on a COCO-format set",
                       description="Evaluate a flaxdet model (or, with --backend reference, the PyTorch reference "
                       "on the same weights) with pycocotools; writes the results JSON and prints the metrics.")
    s.add_argument("--checkpoint", required=True, help="flaxdet model directory or visdet checkpoint")
    s.add_argument("--config", help="for a visdet checkpoint without meta.cfg")
    s.add_argument("--num-classes", type=int, help=NUM_CLASSES_HELP)
    s.add_argument("--ann", required=True)
    s.add_argument("--images")
    s.add_argument("--out", default="eval_out")
    s.add_argument("--scale", nargs=2, default=None, metavar=("LONG", "SHORT"), help=SCALE_HELP)
    s.add_argument("--backend", choices=("flaxdet", "reference"), default="flaxdet")
    s.add_argument("--bucket", choices=("exact", "coarse"), default="exact")
    s.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP + " flaxdet backend only.")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_eval)
    return p


def cmd_presets(args):
    from flaxdet.config import PRESET_DIR, final_bbox_head, is_two_stage, list_presets, load_config

    for name in list_presets():
        cfg = load_config(name)
        depth = getattr(cfg.backbone, "depth", None)
        arch = f"{cfg.backbone.TYPE}{'' if depth is None else f'-{depth}'}"
        if is_two_stage(cfg):
            classes = f"{final_bbox_head(cfg.roi_head).num_classes} classes"
        else:
            arch += f" d{cfg.backbone.deepen_factor} w{cfg.backbone.widen_factor} {cfg.bbox_head.TYPE}"
            classes = "classes from the checkpoint"
        print(f"{name:<20} {cfg.TYPE:<12} {arch:<44} {classes:<28} ({PRESET_DIR / (name + '.yaml')})")
    return 0


def cmd_convert(args):
    from flaxdet.api import convert

    out, report = convert(args.checkpoint, args.out, args.config, args.format, not args.no_strict, args.key_dialect,
                          args.overwrite, num_classes=args.num_classes, classes=args.classes)
    print(report.summary())
    print(f"wrote {out}")
    return 0


def cmd_export(args):
    if args.format == "stablehlo":
        from flaxdet.tools import export_artifact

        export_artifact(args.model_dir, args.out, args.shape, args.batch, args.canvas, args.overwrite,
                        scale=_scale(args.scale))
        return 0
    from flaxdet.tools import export_model_dir  # flaxdet.api.export, with the key count

    out, n = export_model_dir(args.model_dir, args.out, key_dialect=args.key_dialect)
    print(f"wrote {n} keys to {out}")
    return 0


def cmd_parity(args):
    from flaxdet.tools import run_parity

    rows, report = run_parity(args.config, args.checkpoint, args.image, args.against, args.out, _scale(args.scale),
                              num_classes=args.num_classes)
    return 0 if report["passed"] else 1


def cmd_infer(args):
    from flaxdet.tools import run_infer

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    run_infer(args.checkpoint, args.images, args.out, args.config, _scale(args.scale), args.score_thr,
              args.batch_size, progress=not args.no_progress, bucket=args.bucket, dtype=args.dtype,
              num_classes=args.num_classes, workers=args.workers)
    return 0


def _init_distributed(args):
    """``flaxdet train``'s multi-process options -> ``jax.distributed.initialize`` (before JAX starts a backend)."""
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if args.distributed and any(given):
        raise UsageError("--distributed detects the cluster itself: drop --coordinator/--num-processes/--process-id")
    if any(given) and not all(given):
        raise UsageError("multi-process training needs --coordinator HOST:PORT, --num-processes N and "
                         "--process-id I together")
    if all(given):
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process-id {args.process_id} of --num-processes {args.num_processes}: the id must "
                             "be 0 .. N-1")
        import jax

        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    elif args.distributed:
        import jax

        jax.distributed.initialize()


def cmd_train(args):
    from flaxdet.api import TrainConfig, train

    if args.ema_once_per_tensor and not args.ema:
        raise UsageError("--ema-once-per-tensor sets how the EMA treats shared tensors: add --ema")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers {args.workers}: give 0 (in this process) or more worker processes")
    if args.workers is not None and args.loader != "grain":
        raise UsageError("--workers sets the grain loader's processes: drop it, or use --loader grain")
    _init_distributed(args)
    cfg = TrainConfig(args.checkpoint, args.ann, args.out, img_dir=args.images, steps=args.steps,
                      batch_size=args.batch_size, scale=_scale(args.scale),  # None: the model's test scale
                      optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_iters=args.warmup_iters, ckpt_every=args.ckpt_every, keep=args.keep, seed=args.seed,
                      max_gt=args.max_gt, num_devices=args.devices, dtype=args.dtype, ema=args.ema,
                      ema_per_alias=not args.ema_once_per_tensor, force=args.force,
                      loader=args.loader, workers=args.workers, tensorboard=not args.no_tensorboard,
                      mlflow=args.mlflow, mlflow_experiment=args.mlflow_experiment, remat=args.remat)
    _, hist = train(cfg, progress=not args.no_progress)
    if hist:
        print("last step: " + ", ".join(f"{k}={v:.4g}" for k, v in hist[-1].items()))
    print(f"model: {args.out}/model  metrics: {args.out}/metrics.jsonl")
    return 0


def cmd_eval(args):
    import json
    from pathlib import Path

    from flaxdet.evaluation import evaluate
    from flaxdet.tools import load_any_model, reference_twin

    if args.dtype != "float32" and args.backend != "flaxdet":
        raise UsageError(f"--dtype {args.dtype} is a flaxdet option: --backend reference runs float32")
    model, _ = load_any_model(args.checkpoint, args.config, args.num_classes)
    if args.backend == "reference":
        model = reference_twin(model)
    out = Path(args.out)
    m = evaluate(model, args.ann, args.images, _scale(args.scale), args.backend, out / "results.json",
                 progress=not args.no_progress, bucket=args.bucket, dtype=args.dtype)
    m["dtype"] = args.dtype
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    for k in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"):
        if k in m:  # None: pycocotools' -1, undefined (the reason is in metrics["undefined"])
            print(f"{k:<14} {m[k]:.4f}" if m[k] is not None else f"{k:<14} {m['undefined'][k]}")
    print(f"results: {out / 'results.json'}  metrics: {out / 'metrics.json'}")
    return 0


# command-line numbers: (attribute, the option, the smallest value allowed)
_MIN_VALUES = (("batch_size", "--batch-size", 1), ("num_classes", "--num-classes", 1), ("steps", "--steps", 1),
               ("ckpt_every", "--ckpt-every", 1), ("keep", "--keep", 1), ("max_gt", "--max-gt", 1),
               ("devices", "--devices", 1), ("warmup_iters", "--warmup-iters", 0),
               ("weight_decay", "--weight-decay", 0))


def _validate(args):
    """Range checks of the parsed options, before anything is loaded (raises UsageError)."""
    import math

    for attr, opt, low in _MIN_VALUES:
        v = getattr(args, attr, None)
        if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and v >= low):
            raise UsageError(f"{opt} must be >= {low}, got {v}")
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive number, got {lr}")
    thr = getattr(args, "score_thr", None)
    if thr is not None and not 0 <= thr <= 1:
        raise UsageError(f"--score-thr must be between 0 and 1, got {thr}")
    _scale(getattr(args, "scale", None))
    _check_outputs(args)


def _check_outputs(args):
    """``--out`` of each command: a directory we can write (a model directory for convert, a file for export)."""
    from flaxdet.checkpoint import check_model_dir_target, check_writable_dir

    out = getattr(args, "out", None)
    if out is None:
        return
    if args.command == "convert":
        check_model_dir_target(out, args.overwrite)
    elif args.command == "export" and args.format == "stablehlo":
        from flaxdet.artifact import ArtifactError, parse_hw

        if args.shape is None:
            raise UsageError("--format stablehlo needs --shape HxW (the padded network input, e.g. 800x1088)")
        try:
            parse_hw(args.shape)
            if args.canvas is not None:
                parse_hw(args.canvas, "--canvas")
        except ArtifactError as e:
            raise UsageError(str(e)) from None
        if args.batch < 1:
            raise UsageError(f"--batch must be >= 1, got {args.batch}")
        p = Path(out)
        if p.exists() and not p.is_dir():
            raise UsageError(f"--out {out} is a file; --format stablehlo writes a directory")
        check_writable_dir(p.parent if not p.exists() else p)
    elif args.command == "export":
        for opt, v in (("--shape", args.shape), ("--canvas", args.canvas), ("--scale", args.scale)):
            if v is not None:
                raise UsageError(f"{opt} is for --format stablehlo")
        p = Path(out)
        if p.is_dir():
            raise UsageError(f"--out {out} is a directory; give a file name ending in .pth or .safetensors")
        if p.suffix.lower() not in (".pth", ".pt", ".ckpt", ".safetensors"):
            raise UsageError(f"--out {out}: unknown checkpoint format {p.suffix or '(no suffix)'!r}; give a file "
                             "name ending in .pth or .safetensors")
        check_writable_dir(p.parent)
    else:
        check_writable_dir(out)


def _one_line(e: BaseException) -> str:
    import errno

    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        hint = {errno.ENOSPC: "; free some space or write elsewhere (nothing was left half-written)",
                errno.EACCES: "; check the permissions or choose another path",
                errno.EROFS: "; the file system is read-only: choose another path"}.get(e.errno, "")
        return f"{e.strerror}{where}{hint}"
    if isinstance(e, MemoryError):
        return "out of memory"
    return str(e)


def main(argv=None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLAXDET_DEBUG", "") not in ("", "0")
    args = parser.parse_args([a for a in argv if a != "--debug"])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from flaxdet.config import ConfigError

    errors = (ConfigError, FileNotFoundError, UsageError, OSError, MemoryError)
    try:
        from flaxdet.checkpoint import ModelDirError
        from flaxdet.data.coco import DatasetError
        from flaxdet.data.transforms import ImageError
        from flaxdet.tools import CommandError
        from flaxdet_converters.checkpoint_io import CheckpointError
        from flaxdet_converters.convert import ConversionError

        errors = errors + (CheckpointError, ConversionError, ModelDirError, ImageError, DatasetError, CommandError)
    except ImportError:
        pass
    try:
        _validate(args)
        enable_compile_cache()
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"flaxdet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, errors):
            msg = _one_line(e)
        else:  # not a condition we name: still one line, the traceback on request
            msg = (f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:300]} (rerun with --debug for the "
                   "traceback, and please report it)")
        print(f"flaxdet {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
