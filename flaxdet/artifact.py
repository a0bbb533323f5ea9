"""A deployable artifact: a model's jitted predict for one shape bucket, serialized with ``jax.export``.

``flaxdet export DIR --format stablehlo --shape HxW [--batch N] [--canvas HxW] --out ART`` writes::

    ART/manifest.json      input layout, preprocessing constants, output layout, class names, category ids
    ART/weights.npz        the parameters and buffers, in the functions' argument order (w00000, w00001, ...)
    ART/*.stablehlo        the predict functions (jax.export, serialized), weights passed as the first argument
    ART/run_artifact.py    the loader: imports jax and numpy only (and OpenCV to decode and resize images)

The functions are the ones :class:`flaxdet.inference.Detector` jits for that bucket, so an image whose own
padded size is the bucket gets ``flaxdet infer``'s detections: for Mask R-CNN style models ``boxes`` (the box
jit: detections before the mask branch, and the FPN features) and one ``masks_rows_{k}`` per row bucket of
:func:`flaxdet.fast_paths.mask_rows.mask_buckets` (the loader reads the detection count and picks one, as the
Detector does); for the others one ``predict``. Inputs: ``images`` (N, H, W, 3) uint8 BGR, the keep-ratio
resized images zero padded at the bottom/right to the bucket; ``img_shapes`` (N, 2) int32 their (h, w) before
padding; ``scale_factors`` (N, 4) float32 (w, h, w, h) = resized / original. Normalisation (mean, std, channel
order) is inside the graph. Masks are pasted on a static canvas (``--canvas``, default the bucket rounded up to
256: originals up to that size), bool, cropped to each original size by the loader.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet.config import dump_yaml, is_two_stage, test_scale

FORMAT = "flaxdet-stablehlo"
VERSION = 1
RUNNER = Path(__file__).with_name("artifact_runner.py")


class ArtifactError(ValueError):
    """An export that cannot be made as asked (one error line from the CLI)."""


def parse_hw(text, what="--shape"):
    """'800x1344' -> (800, 1344)."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ArtifactError(f"{what} takes HxW (e.g. 800x1344), got {str(text)[:40]!r}") from None
    if h < 1 or w < 1:
        raise ArtifactError(f"{what} must be positive, got {text}")
    return h, w


def _round_up(x, d):
    return -(-int(x) // d) * d


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _export(fn, args, platforms):
    """Traced without the ``onednn_conv`` fast path: its FFI call names a target only flaxdet's library
    registers, and the artifact must load with jax and numpy alone (XLA's convolutions instead: the same
    detections up to float rounding)."""
    from flaxdet import fast_paths

    with fast_paths.use(fast_paths.active() - {"onednn_conv"}):
        exp = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
    return exp, exp.serialize()


def export_stablehlo(model, classes, out_dir, shape, batch=1, canvas=None, meta=None, platforms=None,
                     overwrite=False, log=print, scale=None):
    """Write the artifact of ``model`` for the padded input ``shape`` (H, W) and ``batch`` images into
    ``out_dir`` (see the module doc); ``scale``: the keep-ratio resize the loader applies (default the model's
    test pipeline, :func:`flaxdet.config.test_scale`). Returns the manifest dict."""
    from flaxdet.fast_paths.mask_rows import mask_buckets
    from flaxdet.inference import _has_masks, _mask_jit_split

    cfg = model.cfg
    div = cfg.data_preprocessor.pad_size_divisor
    h, w = (int(v) for v in shape)
    if h % div or w % div:
        raise ArtifactError(f"--shape {h}x{w}: the model pads its inputs to multiples of {div}; give a multiple "
                            f"(e.g. {_round_up(h, div)}x{_round_up(w, div)})")
    if batch < 1:
        raise ArtifactError(f"--batch must be >= 1, got {batch}")
    masks = _has_masks(model)
    canvas = tuple(int(v) for v in canvas) if canvas else (_round_up(h, 256), _round_up(w, 256))
    out = Path(out_dir)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        is_artifact = (out / "manifest.json").is_file()
        if not (overwrite and is_artifact):
            raise ArtifactError(f"--out {out} exists and is not empty; give a new directory"
                                + (" (or --overwrite to replace this artifact)" if is_artifact else ""))
        shutil.rmtree(out)
    platforms = tuple(platforms or (jax.default_backend(),))

    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    wspecs = [_spec(x.shape, x.dtype) for x in leaves]

    def merged(ws):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, ws))

    imgs = _spec((batch, h, w, 3), np.uint8)
    shapes = _spec((batch, 2), np.int32)
    sfs = _spec((batch, 4), np.float32)
    functions, serialized = {}, {}
    if _mask_jit_split(model):
        boxes_fn = lambda ws, i, s, f: merged(ws).predict_boxes(i, s, f, True)  # noqa: E731
        exp, serialized["boxes"] = _export(boxes_fn, (wspecs, imgs, shapes, sfs), platforms)
        functions["boxes"] = "boxes.stablehlo"
        dets_spec, neck_spec = jax.tree.map(lambda a: _spec(a.shape, a.dtype),
                                            jax.tree.unflatten(exp.out_tree, exp.out_avals))
        d = dets_spec["valid"].shape[1]
        rows = [k for k in mask_buckets(d) if k > 0]
        functions["masks"] = {}
        for k in rows:
            fn = lambda ws, nk, dt, f, k=k: merged(ws).roi_head.predict_mask(nk, dt, f, canvas, True, k)[0]  # noqa
            _, serialized[f"masks_rows_{k}"] = _export(fn, (wspecs, neck_spec, dets_spec, sfs), platforms)
            functions["masks"][str(k)] = f"masks_rows_{k}.stablehlo"
    else:
        fn = lambda ws, i, s, f: merged(ws).predict(i, s, f, canvas if masks else None, True, False)  # noqa: E731
        exp, serialized["predict"] = _export(fn, (wspecs, imgs, shapes, sfs), platforms)
        functions["predict"] = "predict.stablehlo"
        d = jax.tree.unflatten(exp.out_tree, exp.out_avals)["valid"].shape[1]

    out.mkdir(parents=True, exist_ok=True)
    for name, blob in serialized.items():
        (out / f"{name}.stablehlo").write_bytes(bytes(blob))
    np.savez(out / "weights.npz", **{f"w{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
    shutil.copyfile(RUNNER, out / "run_artifact.py")
    pre = cfg.data_preprocessor
    scale = tuple(int(v) for v in scale) if scale else test_scale(cfg)
    manifest = dict(
        format=FORMAT, version=VERSION, detector=cfg.TYPE, family="two_stage" if is_two_stage(cfg) else "one_stage",
        masks=masks, platforms=list(platforms), jax_version=jax.__version__, batch=batch,
        functions=functions, weights="weights.npz", num_weights=len(leaves),
        inputs=dict(
            images=dict(shape=[batch, h, w, 3], dtype="uint8", layout="NHWC", channels="BGR",
                        padding="zeros at the bottom and right, from (h, w) of img_shapes to the bucket"),
            img_shapes=dict(shape=[batch, 2], dtype="int32", meaning="(h, w) of each resized image before padding"),
            scale_factors=dict(shape=[batch, 4], dtype="float32",
                               meaning="(w, h, w, h): resized size / original size, as float32")),
        preprocessing=dict(
            decode="OpenCV imread, IMREAD_COLOR (BGR, 8 bit)",
            resize=dict(keep_ratio=True, scale=list(scale), interpolation="bilinear (cv2.INTER_LINEAR)",
                        rule="sf = min(max(scale) / max(h, w), min(scale) / min(h, w)); new_w = int(w * sf + 0.5); "
                             "new_h = int(h * sf + 0.5)"),
            pad_size_divisor=div, in_graph="BGR->RGB when bgr_to_rgb, (x - mean) / std, padding kept at 0",
            mean=list(pre.mean), std=list(pre.std), bgr_to_rgb=bool(pre.bgr_to_rgb),
            rgb_to_bgr=bool(getattr(pre, "rgb_to_bgr", False))),
        outputs=dict(
            bboxes=f"(N, {d}, 4) float32 x1, y1, x2, y2 in original pixels",
            scores=f"(N, {d}) float32", labels=f"(N, {d}) int32 class index", valid=f"(N, {d}) bool",
            **({"masks": f"(N, {d}, {canvas[0]}, {canvas[1]}) bool, the original image at the top left"}
               if masks else {})),
        canvas=list(canvas) if masks else None,
        mask_rows=[int(k) for k in functions["masks"]] if "masks" in functions else None,
        max_detections=int(d), classes=list(classes) if classes else None,
        category_ids=(meta or {}).get("category_ids"), config_yaml=dump_yaml(cfg))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    log(f"wrote {out}: {', '.join(sorted(f'{n}.stablehlo' for n in serialized))}, weights.npz ({len(leaves)} "
        f"arrays), manifest.json, run_artifact.py ({size:.1f} MB); input {batch}x{h}x{w}x3 uint8"
        + (f", mask canvas {canvas[0]}x{canvas[1]}" if masks else ""))
    return manifest
