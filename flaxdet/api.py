"""flaxdet's Python API: what the ``flaxdet`` command does, as functions (the CLI is a thin layer over them).

    import flaxdet

    det = flaxdet.load("checkpoint.pth")          # visdet / MMDetection .pth, .safetensors, or a model dir
    result = det("photo.jpg")                     # Detections: boxes, scores, labels, class_names, masks
    flaxdet.convert("checkpoint.pth", "model/")   # -> a flaxdet model dir (orbax or safetensors)
    flaxdet.export("model/", "model.pth")         # -> a visdet checkpoint again
    flaxdet.train(flaxdet.TrainConfig(checkpoint="model/", ann_file="train.json", out_dir="run/"))
    flaxdet.evaluate("run/model", "val.json")     # pycocotools bbox/segm metrics
"""
from __future__ import annotations

from pathlib import Path

from flaxdet.evaluation import evaluate as _evaluate
from flaxdet.inference import Detections, Detector
from flaxdet.tools import convert_checkpoint, export_model_dir, load_any_model
from flaxdet.training.loop import TrainConfig, train

__all__ = ["Detections", "Detector", "TrainConfig", "convert", "evaluate", "export", "load", "train"]


def load(checkpoint, config=None, dtype=None, num_classes=None) -> Detector:
    """A :class:`Detector` for a flaxdet model dir, or a visdet / MMDetection 3.x checkpoint (``.pth``, runner
    checkpoint, ``.safetensors``) converted in memory. ``config``: a preset name or visdet YAML file, needed
    when the checkpoint carries no config (runner checkpoints do). ``dtype``: None / "float32" (visdet's
    numerics) or "bfloat16" (mixed precision). ``num_classes``: an RTMDet head's class count when neither the
    config nor the checkpoint says (visdet's RTMDet presets leave it out)."""
    model, classes = load_any_model(checkpoint, config, num_classes)
    return Detector(model, classes, dtype=dtype)


def convert(checkpoint, out_dir, config=None, fmt="orbax", strict=True, key_dialect="visdet", overwrite=False,
            num_classes=None, classes=None):
    """visdet checkpoint -> flaxdet model dir (``fmt`` "orbax" or "safetensors"); every key accounted for
    (``strict``). Returns (the model dir, the conversion report). Writes nothing on failure. ``classes``: class
    names to store instead of the checkpoint's (fewer names than the head's classes is an error)."""
    return convert_checkpoint(checkpoint, config, out_dir, fmt, strict, key_dialect, overwrite,
                              num_classes=num_classes, classes=classes)


def export(model_dir, out, key_dialect="visdet") -> Path:
    """flaxdet model dir -> visdet checkpoint (``.pth`` runner-style with classes, or ``.safetensors``);
    ``key_dialect`` "mmdet" writes upstream MMDetection 3.x's key spelling."""
    return export_model_dir(model_dir, out, key_dialect=key_dialect)[0]


def evaluate(model, ann_file, img_dir=None, scale=None, out_json=None, progress=False, bucket="exact",
             config=None):
    """COCO bbox (and segm) metrics of ``model`` -- a :class:`Detector`, a flaxdet model, or a path
    :func:`load` takes -- on a COCO-format annotation file; ``out_json`` keeps the results."""
    if isinstance(model, Detector):
        model = model.model
    elif isinstance(model, str | Path):
        model = load_any_model(model, config)[0]
    return _evaluate(model, ann_file, img_dir, scale, "flaxdet", out_json, progress, bucket=bucket)
