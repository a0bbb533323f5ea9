"""The user-facing jobs behind the CLI and :mod:`flaxdet.api`: convert, export, parity, infer. The PyTorch side
(reference/, an installed visdet) is imported only where used: it is an optional extra."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
from tqdm import tqdm

from flaxdet.checkpoint import check_model_dir_target, load_model_dir, save_model_dir
from flaxdet.config import (
    ConfigError,
    dump_yaml,
    is_two_stage,
    load_config,
    parse_model_config,
    test_scale,
    to_dict,
    with_num_classes,
)
from flaxdet.data.transforms import ImageError, load_image, prepare_test_image, resize_keep_ratio
from flaxdet.evaluation import detections_to_coco
from flaxdet.inference import Detector, make_batch, unpad
from flaxdet.models import build_detector
from flaxdet.parity import format_table
from flaxdet.parity.harness import compare_stages, flaxdet_stages, geometry_of, torch_stages
from flaxdet.visualize import draw_detections, plot_parity
from flaxdet_converters.checkpoint_io import load_checkpoint, save_checkpoint
from flaxdet_converters.convert import export_visdet_state_dict, load_visdet_state_dict


class CommandError(RuntimeError):
    """A job that cannot go on for a reason the user can act on (one error line from the CLI)."""


def _config_for(checkpoint, config, num_classes=None, log=print):
    """The config named by the user, else the one a runner checkpoint carries in meta.cfg; checked against the
    checkpoint's family (one-stage RTMDet keys vs two-stage), with an RTMDet head's ``num_classes`` (visdet's
    presets leave it unset) taken from the checkpoint's class layer or ``num_classes``."""
    if config is not None:
        cfg = load_config(config)
    elif checkpoint.model_cfg is not None:
        cfg = parse_model_config(checkpoint.model_cfg, f"{checkpoint.path} (meta.cfg)")
    else:
        raise ConfigError(f"{checkpoint.path} carries no model config (meta.cfg); pass --config "
                          "(a preset name such as mask_rcnn_r50 or rtmdet_s, or a visdet YAML file)")
    sd = checkpoint.state_dict
    rtmdet_ckpt = any(k.startswith("bbox_head.rtm_cls.") for k in sd)
    two_stage_ckpt = any(k.startswith(("rpn_head.", "roi_head.")) for k in sd)
    if is_two_stage(cfg) and rtmdet_ckpt:
        raise ConfigError(f"{checkpoint.path} is an RTMDet checkpoint (bbox_head.rtm_cls.* keys) but the config is "
                          f"a two-stage {cfg.TYPE}; pass an RTMDet config (e.g. --config rtmdet_s)")
    if not is_two_stage(cfg) and two_stage_ckpt:
        raise ConfigError(f"{checkpoint.path} is a two-stage checkpoint (rpn_head/roi_head keys) but the config is "
                          f"{cfg.TYPE}; pass a two-stage config (e.g. --config mask_rcnn_r50)")
    return with_num_classes(cfg, sd, num_classes, str(checkpoint.path), log)


def convert_checkpoint(ckpt_path, config=None, out=None, fmt="orbax", strict=True, key_dialect="visdet",
                       overwrite=False, log=print, num_classes=None):
    """visdet checkpoint -> flaxdet model dir. Returns (out_dir, report). Writes nothing on failure."""
    if out is not None:
        check_model_dir_target(out, overwrite)  # before the work: --out a file, not writable, not a model dir
    ck = load_checkpoint(ckpt_path)
    for w in getattr(ck, "warnings", []) or []:
        log(f"warning: {w}")
    cfg = _config_for(ck, config, num_classes, log)
    model = build_detector(cfg)
    report = load_visdet_state_dict(model, ck.state_dict, strict=strict, key_dialect=key_dialect)
    renamed = dict(r.split(" -> ") for r in report.renamed)
    meta = dict(source=str(ckpt_path), source_format=ck.source_format,
                key_order=[renamed.get(k, k) for k in ck.state_dict],
                report=report.as_dict())
    out_dir = save_model_dir(out, model, ck.classes, meta, fmt=fmt, overwrite=overwrite)
    return out_dir, report


def export_model_dir(model_dir, out, log=print, key_dialect="visdet"):
    """flaxdet model dir -> visdet checkpoint (.pth runner-style with classes, or .safetensors); ``key_dialect``
    "mmdet": upstream MMDetection's key spelling."""
    model, classes, meta = load_model_dir(model_dir)
    sd = export_visdet_state_dict(model, meta.get("key_order"), key_dialect)
    extra = {"flaxdet_export": {"config_yaml": dump_yaml(model.cfg)}}
    save_checkpoint(out, sd, classes=classes, meta=extra if str(out).endswith(".pth") else None)
    return Path(out), len(sd)


def load_any_model(checkpoint, config=None, num_classes=None):
    """A flaxdet model dir, or a visdet checkpoint (+ config) converted in memory."""
    p = Path(checkpoint)
    if p.is_dir():
        model, classes, _ = load_model_dir(p)
        return model, classes
    ck = load_checkpoint(p)
    model = build_detector(_config_for(ck, config, num_classes))
    load_visdet_state_dict(model, ck.state_dict)
    return model, ck.classes


def reference_twin(model):
    """reference/ (PyTorch) model with the same config and weights as a flaxdet model."""
    from flaxdet_reference import build_detector
    from flaxdet_reference.models import load_state_dict_strict

    ref = build_detector(model.cfg)
    load_state_dict_strict(ref, export_visdet_state_dict(model))
    return ref


def run_parity(config, checkpoint, image, against="reference", out_dir="parity_out", scale=None, log=print,
               num_classes=None):
    """Run flaxdet and the PyTorch side on one image; returns (rows, report dict). ``scale``: the test resize
    (default: the model's, :func:`flaxdet.config.test_scale`). Two-stage models compare every stage through the
    RoI heads; one-stage (RTMDet) models the preprocessed input, backbone, neck, dense head outputs and
    detections (RTMDet-Ins: masks and the first detections' mask logits), see :mod:`flaxdet.parity.harness`."""
    ck = load_checkpoint(checkpoint)
    cfg = _config_for(ck, config, num_classes, log)
    img, meta = prepare_test_image(image, scale or test_scale(cfg))
    model = build_detector(cfg)  # first: a checkpoint that does not fit the config is a ConversionError here
    load_visdet_state_dict(model, ck.state_dict)
    if against == "visdet":
        theirs = _visdet_stages(cfg, checkpoint, img, meta)
    elif against == "reference":
        import torch

        from flaxdet_reference import build_detector as build_ref
        from flaxdet_reference.models import load_state_dict_strict

        ref = build_ref(cfg)
        load_state_dict_strict(ref, ck.state_dict, source=str(checkpoint))
        stages = {}
        ref.predict([torch.from_numpy(img).permute(2, 0, 1).contiguous()], [meta], stages=stages)
        theirs = torch_stages(stages)
    else:
        raise ValueError(f"--against must be 'reference' or 'visdet', got {against!r}")
    det = Detector(model, ck.classes)
    batch = make_batch([img], [meta], cfg.data_preprocessor.pad_size_divisor)
    dets, stages = det.predict_batch(batch, with_stages=True)
    dets, stages = jax.device_get((dets, stages))
    ours = flaxdet_stages(stages, unpad(dets, batch)[0])
    bgeo, mgeo = geometry_of(cfg)
    rows = compare_stages(ours, theirs, bbox_geometry=bgeo, mask_geometry=mgeo, scale_factor=meta["scale_factor"])
    table = format_table(rows)
    log(table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(config=str(config), checkpoint=str(checkpoint), image=str(image), against=against,
                  img_shape=list(meta["img_shape"]), ori_shape=list(meta["ori_shape"]),
                  passed=all(r.passed for r in rows), stages=[r.as_dict() for r in rows])
    (out / "parity.json").write_text(json.dumps(report, indent=1, default=float))
    plot_parity(rows, out / "parity.png", f"flaxdet vs {against}: {Path(image).name}")
    log(f"\n{'PASS' if report['passed'] else 'FAIL'}: {sum(r.passed for r in rows)}/{len(rows)} checks; "
        f"report {out / 'parity.json'}, plot {out / 'parity.png'}")
    return rows, report


def _visdet_stages(cfg, checkpoint, img, meta):
    """Hook the user's installed visdet (same module names as reference/, so the same stages)."""
    try:
        from visdet.apis import init_detector  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        raise CommandError(
            f"--against visdet: visdet is not importable here ({type(e).__name__}: {str(e)[:200]}); "
            "install visdet in this environment, or use --against reference (flaxdet's PyTorch mirror of "
            "visdet, itself checked against recorded visdet outputs)") from None
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(f"model = {to_dict(cfg)!r}\n")
    model = init_detector(f.name, str(checkpoint), device="cpu")
    stages, hooks = {}, []

    def keep(name):
        def hook(_m, _i, out):
            outs = out if isinstance(out, tuple | list) else (out,)
            for i, o in enumerate(outs):
                if hasattr(o, "detach"):
                    stages[f"{name}.{i}" if len(outs) > 1 else name] = o.detach()
        return hook

    for name in ("backbone", "neck"):
        hooks.append(getattr(model, name).register_forward_hook(keep(name)))
    from visdet.apis import inference_detector

    res = inference_detector(model, img)
    for h in hooks:
        h.remove()
    inst = res.pred_instances
    stages.update({"det.bboxes": inst.bboxes, "det.scores": inst.scores, "det.labels": inst.labels})
    if hasattr(inst, "masks"):
        stages["det.masks"] = inst.masks
    return {k: (v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v)) for k, v in stages.items()}


def run_infer(checkpoint, images, out_dir, config=None, scale=None, score_thr=0.3, batch_size=1,
              progress=True, log=print, bucket="exact", dtype=None, num_classes=None):
    """Detect on image files; write COCO-format results JSON (+ RLE masks) and overlay PNGs.
    ``dtype``: compute dtype ("bfloat16": mixed precision; see flaxdet.nn.set_compute_dtype); ``scale``: the
    test resize (default: the model's, :func:`flaxdet.config.test_scale`)."""
    model, classes = load_any_model(checkpoint, config, num_classes)
    scale = scale or test_scale(model.cfg)
    det = Detector(model, classes, dtype=dtype)
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in images]
    results, images_json = [], []
    bar = tqdm(total=len(paths), desc="infer", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        originals, resized, metas = [], [], []
        for p in chunk:
            try:
                im = load_image(p)
            except ImageError as e:
                log(f"skipping: {e}")
                bar.update(1)
                continue
            r, m = resize_keep_ratio(im, scale)
            originals.append((p, im))
            resized.append(r)
            metas.append(m)
        if not resized:
            continue
        for (p, im), d in zip(originals, det.detect(resized, metas, bucket=bucket)):
            image_id = len(images_json) + 1
            images_json.append(dict(id=image_id, file_name=str(p), height=im.shape[0], width=im.shape[1]))
            for r in detections_to_coco(d, image_id, range(max(d["labels"], default=-1) + 1)):
                if classes:
                    r["category_name"] = classes[r["category_id"]]
                results.append(r)
            cv2.imwrite(str(out / "overlays" / f"{p.stem}.png"), draw_detections(im, d, classes, score_thr))
            bar.update(1)
    bar.close()
    (out / "results.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps(dict(images=images_json, classes=classes)))
    log(f"{len(results)} detections on {len(images_json)} image(s) -> {out / 'results.json'}; "
        f"overlays in {out / 'overlays'}")
    return results
