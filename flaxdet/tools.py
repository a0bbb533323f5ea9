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
    short_repr,
    test_scale,
    with_num_classes,
)
from flaxdet.data.transforms import ImageError, prepare_test_image
from flaxdet.evaluation import detections_to_coco
from flaxdet.fast_paths import onednn
from flaxdet.inference import Detector, detect_stream, expand_inputs, make_batch, unpad
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


def _num_classes(cfg) -> int:
    from flaxdet.evaluation import num_classes_of

    return num_classes_of(cfg)


def check_class_names(classes, cfg, source, log=print, strict=True):
    """The class names a checkpoint stores against the classes its head predicts: fewer names than classes is an
    error (``strict``; else a warning: the missing ones are shown as numbers), more a warning."""
    if classes is None:
        return None
    n = _num_classes(cfg)
    if n is None or len(classes) == n:
        return classes
    if len(classes) < n:
        msg = (f"{source} names {len(classes)} classes ({short_repr(list(classes))}) but the model's head predicts "
               f"{n}; pass the full list with --classes NAME ... (or a config whose num_classes is {len(classes)})")
        if strict:
            raise CommandError(msg)
        log(f"warning: {msg}; labels without a name are shown as numbers")
    else:
        log(f"warning: {source} names {len(classes)} classes but the model's head predicts {n}; the first {n} "
            "are used")
    return classes


def _dtype_warnings(report, log):
    def some(xs):
        return ", ".join(xs[:3]) + (f" (+{len(xs) - 3} more)" if len(xs) > 3 else "")

    if report.cast:
        log(f"warning: {len(report.cast)} tensors stored in another dtype were cast to the model's: "
            f"{some(report.cast)}; recorded in meta.json (source_dtypes), `flaxdet export` writes them back in "
            "their dtype")
    if report.nonfinite:
        log(f"warning: {len(report.nonfinite)} tensors hold NaN/Inf values: {some(report.nonfinite)}; such a model "
            "gives no (or meaningless) detections: check the source checkpoint")


def convert_checkpoint(ckpt_path, config=None, out=None, fmt="orbax", strict=True, key_dialect="visdet",
                       overwrite=False, log=print, num_classes=None, classes=None):
    """visdet checkpoint -> flaxdet model dir. Returns (out_dir, report). Writes nothing on failure. ``classes``:
    class names to store instead of the checkpoint's (meta.dataset_meta.classes)."""
    if out is not None:
        check_model_dir_target(out, overwrite)  # before the work: --out a file, not writable, not a model dir
    ck = load_checkpoint(ckpt_path)
    for w in getattr(ck, "warnings", []) or []:
        log(f"warning: {w}")
    cfg = _config_for(ck, config, num_classes, log)
    names = check_class_names(list(classes) if classes else ck.classes, cfg,
                              "--classes" if classes else f"{ckpt_path} (meta.dataset_meta.classes)", log)
    model = build_detector(cfg)
    report = load_visdet_state_dict(model, ck.state_dict, strict=strict, key_dialect=key_dialect)
    renamed = dict(r.split(" -> ") for r in report.renamed)
    for k, dt in getattr(ck, "source_dtypes", {}).items():  # widened on reading (bfloat16 .pth)
        k = renamed.get(k, k)
        report.cast.append(f"{k}: {dt} -> float32")
        report.source_dtypes[k] = dt
    _dtype_warnings(report, log)
    meta = dict(source=str(ckpt_path), source_format=ck.source_format,
                key_order=[renamed.get(k, k) for k in ck.state_dict],
                report=report.as_dict(), source_dtypes=report.source_dtypes,
                nonfinite=len(report.nonfinite))
    out_dir = save_model_dir(out, model, names, meta, fmt=fmt, overwrite=overwrite)
    return out_dir, report


def export_model_dir(model_dir, out, log=print, key_dialect="visdet"):
    """flaxdet model dir -> visdet checkpoint (.pth runner-style with classes, or .safetensors); ``key_dialect``
    "mmdet": upstream MMDetection's key spelling. Tensors the source checkpoint stored in another dtype (meta.json's
    ``source_dtypes``, recorded at convert) are written back in it."""
    model, classes, meta = load_model_dir(model_dir)
    sd = export_visdet_state_dict(model, meta.get("key_order"), key_dialect, dtypes=meta.get("source_dtypes"))
    extra = {"flaxdet_export": {"config_yaml": dump_yaml(model.cfg)}}
    save_checkpoint(out, sd, classes=classes, meta=extra if str(out).endswith(".pth") else None)
    return Path(out), len(sd)


def export_artifact(model_dir, out, shape, batch=1, canvas=None, overwrite=False, log=print, scale=None):
    """flaxdet model dir -> a StableHLO artifact directory (:mod:`flaxdet.artifact`) for the padded input
    ``shape`` ("HxW" or (H, W)), ``batch`` images per call, masks on ``canvas`` (default: ``shape`` rounded up
    to 256); ``scale``: the loader's keep-ratio resize (default: the model's test pipeline)."""
    from flaxdet.artifact import ArtifactError, export_stablehlo, parse_hw

    try:
        hw = parse_hw(shape) if isinstance(shape, str) else tuple(shape)
        cv = parse_hw(canvas, "--canvas") if isinstance(canvas, str) else canvas
        model, classes, meta = load_model_dir(model_dir)
        return export_stablehlo(model, classes, out, hw, batch, cv, meta, overwrite=overwrite, log=log,
                                scale=scale)
    except ArtifactError as e:
        raise CommandError(str(e)) from None


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
    detections (RTMDet-Ins: masks and the first detections' mask logits), see :mod:`flaxdet.parity.harness`.

    ``against="visdet"``: the installed visdet builds the model from the user's config as written (see
    :func:`visdet_model_config`) and loads the same tensors."""
    if against == "visdet":
        _import_visdet()  # before the work: not installed is one error line
    ck = load_checkpoint(checkpoint)
    cfg = _config_for(ck, config, num_classes, log)
    img, meta = prepare_test_image(image, scale or test_scale(cfg))
    model = build_detector(cfg)  # first: a checkpoint that does not fit the config is a ConversionError here
    load_visdet_state_dict(model, ck.state_dict)
    visdet_source = None
    if against == "visdet":
        visdet_cfg, visdet_source = visdet_model_config(config, ck, cfg)
        log(f"visdet builds the model from {visdet_source}")
        theirs = _visdet_stages(visdet_cfg, cfg, ck.state_dict, img, meta)
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
                  visdet_config=visdet_source,
                  img_shape=list(meta["img_shape"]), ori_shape=list(meta["ori_shape"]),
                  passed=all(r.passed for r in rows), stages=[r.as_dict() for r in rows])
    (out / "parity.json").write_text(json.dumps(report, indent=1, default=float))
    plot_parity(rows, out / "parity.png", f"flaxdet vs {against}: {Path(image).name}")
    log(f"\n{'PASS' if report['passed'] else 'FAIL'}: {sum(r.passed for r in rows)}/{len(rows)} checks; "
        f"report {out / 'parity.json'}, plot {out / 'parity.png'}")
    return rows, report


def _import_visdet():
    try:
        from visdet import models as _  # noqa: F401  (registers visdet's modules)
        from visdet.engine.config import Config
    except Exception as e:  # ImportError or a broken install
        raise CommandError(
            f"--against visdet: visdet is not importable here ({type(e).__name__}: {str(e)[:200]}); "
            "install visdet in this environment, or use --against reference (flaxdet's PyTorch mirror of "
            "visdet, itself checked against recorded visdet outputs)") from None
    return Config


def visdet_model_config(config, checkpoint, cfg):
    """The model config visdet builds, as the user wrote it: the YAML file read by visdet's own loader
    (``Config.fromfile``: its ``_base_`` chain as visdet merges it), visdet's own preset of that name, or the
    ``model`` dict of a runner checkpoint's ``meta.cfg`` (parsed without executing it). Never flaxdet's dataclass
    dump. Returns (visdet ConfigDict, where it came from). ``preset_meta`` is dropped as visdet's own runner and
    inferencer do; an RTMDet head without ``num_classes`` (visdet's presets leave it out) gets the checkpoint's,
    as flaxdet resolved it."""
    Config = _import_visdet()
    if config is not None and Path(config).is_file():
        d, source = Config.fromfile(str(config)).to_dict(), str(config)
    elif config is not None:
        from visdet.presets.registry import MODEL_PRESETS

        if str(config) not in MODEL_PRESETS:
            raise CommandError(f"--against visdet: visdet has no preset {str(config)!r} (its presets: "
                               f"{short_repr(sorted(MODEL_PRESETS.list()))}); pass the model's YAML file as --config")
        d, source = Config(MODEL_PRESETS.get(str(config))).to_dict(), f"visdet preset {config}"
    elif checkpoint.model_cfg is not None:
        d, source = dict(checkpoint.model_cfg), f"{checkpoint.path} (meta.cfg)"
    else:
        raise ConfigError(f"{checkpoint.path} carries no model config (meta.cfg); pass --config")
    if "model" in d and "type" not in d:
        d = dict(d["model"])
    d.pop("preset_meta", None)
    head = d.get("bbox_head")
    if not is_two_stage(cfg) and isinstance(head, dict) and head.get("num_classes") is None:
        d["bbox_head"] = dict(head, num_classes=cfg.bbox_head.num_classes)
        source += f" (bbox_head.num_classes {cfg.bbox_head.num_classes} from the checkpoint)"
    return Config(d), source


def _visdet_stages(model_cfg, cfg, state_dict, img, meta):
    """Run the user's installed visdet -- the model built from ``model_cfg`` (see :func:`visdet_model_config`), the
    checkpoint's tensors loaded strictly -- on the same resized image and metadata, hooking the stages the harness
    compares (preprocessed input, backbone, neck, RPN / dense head outputs, proposals, RoI features and heads,
    detections)."""
    import copy

    import torch
    from visdet.engine.model.utils import revert_sync_batchnorm
    from visdet.engine.registry import init_default_scope
    from visdet.registry import MODELS
    from visdet.structures import DetDataSample

    init_default_scope("visdet")
    try:
        model = revert_sync_batchnorm(MODELS.build(copy.deepcopy(model_cfg)))
    except Exception as e:
        raise CommandError(f"--against visdet: visdet cannot build the model from the config "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    res = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise CommandError(f"--against visdet: the checkpoint does not fit visdet's model: missing "
                           f"{short_repr(res.missing_keys)}, unexpected {short_repr(res.unexpected_keys)}")
    model.eval()
    stages, hooks = {}, []

    def keep(fn):
        def hook(_m, _i, out):
            fn(out)
        return hook

    def levels(prefix, outs):
        stages.update({f"{prefix}.{i}": o for i, o in enumerate(outs)})

    def first(name):
        def put(out):
            stages.setdefault(name, out)
        return put

    def on(module, fn):
        if module is not None:
            hooks.append(module.register_forward_hook(keep(fn)))

    on(model.data_preprocessor, lambda out: stages.__setitem__("preprocessed", out["inputs"]))
    on(model.backbone, lambda out: levels("backbone", out))
    on(getattr(model, "neck", None), lambda out: levels("neck", out))
    two_stage = is_two_stage(cfg)
    if two_stage:
        def rpn(out):
            levels("rpn_head.cls_score", out[0])
            levels("rpn_head.bbox_pred", out[1])

        on(model.rpn_head, rpn)
        rh = model.roi_head
        predict = rh.predict

        def roi_predict(x, rpn_results_list, *a, **k):
            stages["proposals.bboxes"] = rpn_results_list[0].bboxes
            stages["proposals.scores"] = rpn_results_list[0].scores
            return predict(x, rpn_results_list, *a, **k)

        rh.predict = roi_predict
        if not isinstance(rh.bbox_head, torch.nn.ModuleList):  # Cascade: its per-stage rows are not hooked
            on(rh.bbox_roi_extractor, first("bbox_roi_extractor"))

            def bbox_head(out):
                stages.setdefault("bbox_head.cls_score", out[0])
                stages.setdefault("bbox_head.bbox_pred", out[1])

            on(rh.bbox_head, bbox_head)
            if getattr(rh, "with_mask", False):
                if not getattr(rh, "share_roi_extractor", False):
                    on(rh.mask_roi_extractor, first("mask_roi_extractor"))
                on(rh.mask_head, first("mask_head.mask_preds"))
    else:
        def dense(out):
            for name, per_level in zip(("cls_scores", "bbox_preds", "kernel_preds"), out):
                levels(name, per_level)
            if len(out) > 3:
                stages["mask_feats"] = out[3]

        on(model.bbox_head, dense)
    h, w = meta["img_shape"][:2]
    sf = tuple(float(v) for v in meta["scale_factor"])
    sf = sf[:2] * 2 if two_stage else sf[:2]  # visdet's Resize: (w, h, w, h); its RTMDet heads take (w, h) only
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=tuple(meta["ori_shape"][:2]), scale_factor=sf))
    data = dict(inputs=[torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()],
                data_samples=[sample])
    try:
        with torch.inference_mode():
            inst = model.test_step(data)[0].pred_instances
    finally:
        for hk in hooks:
            hk.remove()
    stages.update({"det.bboxes": inst.bboxes, "det.scores": inst.scores, "det.labels": inst.labels})
    if "masks" in inst:
        stages["det.masks"] = inst.masks
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in stages.items()}


def _overlay_names(paths):
    """``<stem>.png`` per input; inputs sharing a stem (a/x.jpg, b/x.jpg, or one file twice) get ``<stem>-2.png``,
    ``<stem>-3.png`` ... in input order, so no overlay overwrites another."""
    seen, names = {}, []
    for p in paths:
        k = seen[p.stem] = seen.get(p.stem, 0) + 1
        names.append(f"{p.stem}.png" if k == 1 else f"{p.stem}-{k}.png")
    taken = set()
    for i, n in enumerate(names):  # "x-2.png" could also be a real stem's name: go on counting
        while n in taken:
            stem, _, k = n[:-4].rpartition("-")
            n = f"{stem}-{int(k) + 1}.png" if k.isdigit() and stem else f"{n[:-4]}-2.png"
        taken.add(n)
        names[i] = n
    return names


def _category_ids(meta, n_classes, log):
    """COCO category ids a model dir keeps (meta.json ``category_ids``, one per class, written at training on a COCO
    set), or None: then results carry the 0-based label."""
    ids = (meta or {}).get("category_ids")
    if ids is None:
        return None
    if (not isinstance(ids, list) or len(ids) != n_classes
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        log(f"warning: the model directory's category_ids ({short_repr(ids)}) are not {n_classes} integers, one per "
            "class; writing 0-based labels as category_id")
        return None
    return ids


def run_infer(checkpoint, images, out_dir, config=None, scale=None, score_thr=0.3, batch_size=1,
              progress=True, log=print, bucket="exact", dtype=None, num_classes=None, workers=2):
    """Detect on image files; write COCO-format results JSON (+ RLE masks) and overlay PNGs.
    ``images``: files, folders (their image files) and glob patterns (:func:`flaxdet.inference.expand_inputs`).
    ``dtype``: compute dtype ("bfloat16": mixed precision; see flaxdet.nn.set_compute_dtype); ``scale``: the
    test resize (default: the model's, :func:`flaxdet.config.test_scale`). Pipelined
    (:func:`flaxdet.inference.detect_stream`): ``workers`` threads decode and resize ahead, batches of up to
    ``batch_size`` images of one shape bucket run while earlier results are written.

    Results are appended to ``OUT/results.jsonl`` (one line per image, flushed) as they come, in input order, so
    a crash keeps what was done; at the end they are merged into ``results.json`` + ``images.json`` and the JSON
    lines file is removed. ``category_id`` is the model directory's COCO category id when it keeps them
    (``category_ids`` in meta.json), else the 0-based label. Raises CommandError when no input could be read."""
    p = Path(checkpoint)
    if p.is_dir():
        model, classes, meta = load_model_dir(p)
    else:
        (model, classes), meta = load_any_model(checkpoint, config, num_classes), {}
    n_cls = _num_classes(model.cfg)
    classes = check_class_names(classes, model.cfg, f"{checkpoint}'s class names", log, strict=False)
    cat_ids = _category_ids(meta, n_cls, log)
    scale = scale or test_scale(model.cfg)
    onednn.note_if_missing(log)
    det = Detector(model, classes, dtype=dtype)
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    inputs = expand_inputs(images)
    files = [i for i, x in enumerate(inputs) if isinstance(x, Path)]
    overlay_names = dict(zip(files, _overlay_names([inputs[i] for i in files])))
    results, images_json, skipped = [], [], []
    partial = out / "results.jsonl"
    bar = tqdm(total=len(inputs), desc="infer", unit="img", disable=not progress, file=sys.stderr)
    with open(partial, "w") as jl:
        for r in detect_stream(det, inputs, scale, batch_size, bucket, model.cfg.data_preprocessor.pad_size_divisor,
                               workers):
            bar.update(1)
            if r.error is not None:
                if not isinstance(r.error, ImageError):
                    raise r.error
                log(f"skipping: {r.error}")
                skipped.append(str(r.source))
                continue
            p, im, d, name = r.source, r.image, r.detections, overlay_names[r.index]
            image_id = len(images_json) + 1
            info = dict(id=image_id, file_name=str(p), height=im.shape[0], width=im.shape[1],
                        overlay=f"overlays/{name}")
            rows = detections_to_coco(d, image_id, cat_ids or range(max(n_cls, max(d["labels"], default=-1) + 1)))
            for row, lab in zip(rows, d["labels"]):
                if classes:
                    row["category_name"] = classes[lab] if lab < len(classes) else str(int(lab))
            cv2.imwrite(str(out / "overlays" / name), draw_detections(im, d, classes, score_thr))
            jl.write(json.dumps(dict(image=info, results=rows)) + "\n")
            jl.flush()
            images_json.append(info)
            results += rows
    bar.close()
    if not images_json:
        partial.unlink(missing_ok=True)
        raise CommandError(f"none of the {len(inputs)} input(s) could be read ({short_repr(skipped)}); give image "
                           "files OpenCV can decode, folders of them, or glob patterns (\"photos/*.jpg\")")
    _write_json_atomic(out / "results.json", results)
    _write_json_atomic(out / "images.json", dict(images=images_json, classes=classes,
                                                 category_ids=cat_ids, skipped=skipped))
    partial.unlink()
    log(f"{len(results)} detections on {len(images_json)} image(s) -> {out / 'results.json'}; "
        f"overlays in {out / 'overlays'}" + (f"; {len(skipped)} input(s) skipped" if skipped else ""))
    return results


def _write_json_atomic(path, obj):
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
