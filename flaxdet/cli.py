"""flaxdet command line: convert a visdet checkpoint, prove parity, run inference, go back to visdet."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
flaxdet: a weight-compatible JAX/Flax port of visdet (MMDetection 3.x fork).

Typical session:
  flaxdet presets                                              # models flaxdet knows
  flaxdet convert epoch_12.pth --config mask_rcnn_r50 --out model/
  flaxdet parity --config mask_rcnn_r50 --checkpoint epoch_12.pth --image photo.jpg
  flaxdet infer --checkpoint model/ --images photos/*.jpg --out detections/
  flaxdet export model/ --out back_to_visdet.pth

--config takes a preset name (see `flaxdet presets`) or a visdet YAML model file. A checkpoint
written by visdet's runner carries its config (meta.cfg), so --config may be omitted for those.
"""


def _scale(values):
    if len(values) != 2:
        raise argparse.ArgumentTypeError("--scale takes two integers: LONG SHORT (e.g. 1333 800)")
    return tuple(int(v) for v in values)


def build_parser():
    p = argparse.ArgumentParser(prog="flaxdet", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--format", choices=("orbax", "safetensors"), default="orbax",
                   help="params as an orbax checkpoint (default) or one flat .safetensors file")
    s.add_argument("--no-strict", action="store_true", help="convert what fits; report the rest")
    s.add_argument("--key-dialect", choices=("visdet", "mmdet"), default="visdet",
                   help="'mmdet' accepts upstream MMDetection-3.x key spellings (e.g. Swin patch_embed.projection)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="flaxdet model directory -> visdet checkpoint",
                       description="Write a flaxdet model back as a visdet checkpoint: .pth (runner-style, "
                       "with meta.dataset_meta.classes) or .safetensors. Keys, layouts and dtypes are visdet's; "
                       "a visdet -> flaxdet -> visdet round trip is bit-identical.")
    s.add_argument("model_dir")
    s.add_argument("--out", required=True, help="output .pth or .safetensors")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("parity", help="per-stage comparison of flaxdet against PyTorch on an image",
                       description="Run the same checkpoint through flaxdet (jit) and through PyTorch "
                       "(reference/: flaxdet's mirror of visdet, or your installed visdet) on one image with "
                       "visdet's test pipeline, and compare every stage: backbone, FPN, RPN, proposals, RoI "
                       "features, heads, detections and masks. Prints a table, writes parity.json and "
                       "parity.png, exits 1 if any stage is outside its tolerance.")
    s.add_argument("--config", help="preset name or visdet YAML (optional for runner checkpoints)")
    s.add_argument("--checkpoint", required=True, help="visdet checkpoint file")
    s.add_argument("--image", required=True)
    s.add_argument("--against", choices=("reference", "visdet"), default="reference")
    s.add_argument("--out", default="parity_out", help="directory for parity.json / parity.png")
    s.add_argument("--scale", nargs=2, default=(1333, 800), metavar=("LONG", "SHORT"),
                   help="test-time keep-ratio resize (default 1333 800, visdet's COCO preset)")
    s.set_defaults(func=cmd_parity)

    s = sub.add_parser("infer", help="detect on images: COCO-format JSON + overlay PNGs",
                       description="Run a flaxdet model (a directory from `flaxdet convert`, or a visdet "
                       "checkpoint with --config) on image files with visdet's test pipeline.")
    s.add_argument("--checkpoint", required=True, help="flaxdet model directory or visdet checkpoint")
    s.add_argument("--config", help="needed only for a visdet checkpoint without meta.cfg")
    s.add_argument("--images", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--scale", nargs=2, default=(1333, 800), metavar=("LONG", "SHORT"))
    s.add_argument("--score-thr", type=float, default=0.3, help="overlay threshold (JSON keeps all)")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_infer)
    return p


def cmd_presets(args):
    from flaxdet.config import PRESET_DIR, list_presets, load_config

    for name in list_presets():
        cfg = load_config(name)
        print(f"{name:<20} {cfg.TYPE:<12} {cfg.backbone.TYPE}-{getattr(cfg.backbone, 'depth', '')} "
              f"{cfg.roi_head.bbox_head.num_classes} classes   ({PRESET_DIR / (name + '.yaml')})")
    return 0


def cmd_convert(args):
    from flaxdet.tools import convert_checkpoint

    out, report = convert_checkpoint(args.checkpoint, args.config, args.out, args.format, not args.no_strict,
                                     args.key_dialect, args.overwrite)
    print(report.summary())
    print(f"wrote {out}")
    return 0


def cmd_export(args):
    from flaxdet.tools import export_model_dir

    out, n = export_model_dir(args.model_dir, args.out)
    print(f"wrote {n} keys to {out}")
    return 0


def cmd_parity(args):
    from flaxdet.tools import run_parity

    rows, report = run_parity(args.config, args.checkpoint, args.image, args.against, args.out, _scale(args.scale))
    return 0 if report["passed"] else 1


def cmd_infer(args):
    from flaxdet.tools import run_infer

    run_infer(args.checkpoint, args.images, args.out, args.config, _scale(args.scale), args.score_thr,
              args.batch_size, progress=not args.no_progress)
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from flaxdet.config import ConfigError

    errors = (ConfigError, FileNotFoundError)
    try:
        from flaxdet.checkpoint import ModelDirError
        from flaxdet.data.transforms import ImageError
        from flaxdet_converters.checkpoint_io import CheckpointError
        from flaxdet_converters.convert import ConversionError

        errors = errors + (CheckpointError, ConversionError, ModelDirError, ImageError)
    except ImportError:
        pass
    try:
        return args.func(args)
    except errors as e:
        print(f"flaxdet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
