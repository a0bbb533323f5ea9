"""bf16 mixed precision (flaxdet.nn.set_compute_dtype): convolutions and matmuls in bf16 with float32
accumulation, everything else (BN, softmax/sigmoid, box decoding, NMS, RoIAlign, pasting, losses) in
float32, parameters and optimizer state float32.

- the policy: under bf16 every conv/matmul of the traced model takes bf16 operands and returns float32,
  and nothing else is bf16 (jaxpr inspection, no compile);
- inference on real weights (the visdet golden checkpoints): bf16 detections match visdet's recorded
  float32 detections and features within BF16_TOLERANCES (measured first; values and reasons there),
  one image fast, all three ``-m slow``;
- training: a bf16 train step gives finite losses, float32 params/optimizer state, and (slow) losses
  and updates close to the float32 step;
- the CLI accepts ``--dtype`` on infer and train.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxdet.config import load_config
from flaxdet.inference import Detector, make_batch, unpad
from flaxdet.models import build_detector
from flaxdet.nn import set_compute_dtype
from flaxdet.parity import Tol
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import load_visdet_state_dict
from parity_tests.goldens import GOLDENS, IMAGES, config_path, golden_image, require_goldens

# Measured first (flaxdet bf16 vs visdet's float32 golden detections, R18 golden weights, 3 images, AMD EPYC):
# backbone/neck 1.2e-2..7.6e-2 scale-relative; of visdet's 100 detections 73-91% have a same-label bf16 box
# at IoU > 0.9 (and the same the other way), score differences on those <= 0.151.
_WHY = ("bf16 keeps 8 mantissa bits (2^-9 ~ 2e-3 relative rounding per operand; float32 accumulation), and "
        "R18's residual stack grows that to 3-8e-2 of the feature scale (measured). The golden weights are "
        "seeded, not trained: their 100 detections are overlapping boxes with close scores (0.3-0.98), so "
        "such shifts reorder NMS survivors and the top-100 cut -- a trained detector's separated scores move "
        "far less. ")
BF16_TOLERANCES = {  # flaxdet.parity.Tol: value + reason
    "bf16.features": Tol(0.15, _WHY + "Backbone C5 / FPN P2 / P6, scale-relative; observed <= 7.6e-2."),
    "bf16.det.box_iou": Tol(0.9, "a detection is matched when a same-label detection of the other side overlaps "
                                 "it at IoU >= 0.9"),
    "bf16.det.matched": Tol(0.6, _WHY + "Fraction of each side's detections matched on the other; observed "
                                 "0.73-0.91 (top-20: 0.75-0.90)."),
    "bf16.det.score": Tol(0.2, _WHY + "Absolute score difference of matched detections; observed <= 0.151."),
    "bf16.train.loss": Tol(0.05, "bf16 vs float32 train step, each loss term relative; forward features "
                                 "differ by ~5e-2 of their scale, losses average over thousands of anchors/RoIs; "
                                 "observed <= 2.8e-2 (loss_bbox; total loss 8e-3)"),
}
# Not a bf16 test case: the golden R50 weights amplify input perturbations ~1e5x (README, Training: 1e-7
# weight noise moves their gradients 5e-2); under bf16 their C5 differs by 0.33 of its scale (measured).
BOX_IOU = BF16_TOLERANCES["bf16.det.box_iou"].rtol
SCORE = BF16_TOLERANCES["bf16.det.score"].rtol
MATCHED = BF16_TOLERANCES["bf16.det.matched"].rtol
FEATURES = BF16_TOLERANCES["bf16.features"].rtol
CASE = "mask_rcnn_tiny_r18"


def golden_model(case):
    model = build_detector(load_config(config_path(case)))
    ck = load_checkpoint(GOLDENS / case / "state_dict.pth")
    assert load_visdet_state_dict(model, ck.state_dict).ok
    return model, ck.classes


def box_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def match(want, got):
    """Per detection of ``want``: best same-label IoU in ``got`` and that detection's score difference."""
    iou = box_iou(want["bboxes"], got["bboxes"])
    iou = np.where(want["labels"][:, None] == got["labels"][None], iou, -1.0)
    j = iou.argmax(1)
    return iou[np.arange(len(j)), j], np.abs(want["scores"] - got["scores"][j])


def check_against_golden(det, case, image):
    g = golden_image(case, image)
    b = make_batch([g["input_bgr_uint8"]], [g.meta])
    dets, stages = jax.device_get(det.predict_batch(b, with_stages=True))
    got, want = unpad(dets, b)[0], g.det
    feats = {k: float(np.abs(np.asarray(stages[k]).transpose(0, 3, 1, 2) - g[k]).max() / np.abs(g[k]).max())
             for k in ("backbone.3", "neck.0", "neck.4")}
    stats = {}
    for name, x, y in (("golden->bf16", want, got), ("bf16->golden", got, want)):
        iou, sd = match(x, y)
        ok = iou >= BOX_IOU
        stats[name] = dict(n=len(iou), matched=float(ok.mean()),
                           max_score_diff=float(sd[ok].max()) if ok.any() else None)
    print(f"{case}/{image}: {len(got['scores'])} bf16 vs {len(want['scores'])} golden detections; features "
          f"{ {k: f'{v:.1e}' for k, v in feats.items()} }; {stats}")
    assert max(feats.values()) <= FEATURES, feats
    for name, st in stats.items():
        assert st["matched"] >= MATCHED, (name, st)
        assert st["max_score_diff"] <= SCORE, (name, st)
    return stats


# -- the policy -----------------------------------------------------------------------------------------

def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else ():
            yield from _eqns(sub)
        for p in e.params.values():
            for j in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.mark.goldens
def test_policy_bf16_operands_float32_results():
    """Traced (not compiled) tiny R18 forward: each conv/dot takes bf16 operands and yields float32;
    BN, activations and every other floating op stay float32 (bf16 operands are only cast, sliced and
    reshaped on their way in); parameters stay float32."""
    require_goldens()
    model, _ = golden_model("mask_rcnn_tiny_r18")
    n = set_compute_dtype(model, "bfloat16")
    assert n > 0
    x = jnp.zeros((1, 64, 96, 3), jnp.uint8)
    f = lambda: model.extract_feat(model.data_preprocessor(x, jnp.asarray([[64, 96]], jnp.int32)))[1]  # noqa: E731
    jaxpr = jax.make_jaxpr(f)().jaxpr
    heavy, other_bf16 = 0, []
    for e in _eqns(jaxpr):
        if e.primitive.name in ("conv_general_dilated", "dot_general", "ffi_call"):  # ffi_call: onednn_conv
            heavy += 1
            assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e
            assert all(v.aval.dtype == jnp.float32 for v in e.outvars), e
        elif e.primitive.name not in ("convert_element_type", "reshape", "slice"):  # moves, no arithmetic
            # (a 1x1 conv is a matmul over its strided, flattened bf16 input: flaxdet.fast_paths.conv.conv1x1)
            other_bf16 += [e.primitive.name for v in e.outvars if getattr(v.aval, "dtype", None) == jnp.bfloat16]
    assert heavy > 20 and not other_bf16, (heavy, other_bf16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert all(o.dtype == jnp.float32 for o in jax.eval_shape(f))
    set_compute_dtype(model, "float32")
    g = lambda: model.extract_feat(model.data_preprocessor(x, jnp.asarray([[64, 96]], jnp.int32)))[1]  # noqa: E731
    jaxpr = jax.make_jaxpr(g)().jaxpr  # a new function: make_jaxpr caches traces per function object
    assert not any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for e in _eqns(jaxpr) for v in e.outvars)


@pytest.mark.goldens
def test_set_compute_dtype_rejects_unknown():
    require_goldens()
    model, _ = golden_model("mask_rcnn_tiny_r18")
    with pytest.raises(ValueError, match="compute dtype"):
        set_compute_dtype(model, "float16")


# -- inference ------------------------------------------------------------------------------------------

_DETECTOR = {}


@pytest.mark.goldens
@pytest.mark.parametrize("image", [pytest.param(i, marks=[] if i == "coco_test_12510" else [pytest.mark.slow])
                                   for i in IMAGES])
def test_bf16_inference_matches_visdet_float32(image):
    """bf16 flaxdet vs visdet's recorded float32 detections (flaxdet float32 equals those to 4e-3 px,
    parity_tests/test_flaxdet_goldens.py), both directions."""
    require_goldens()
    if not _DETECTOR:
        model, classes = golden_model(CASE)
        _DETECTOR["det"] = Detector(model, classes, dtype="bfloat16")
    check_against_golden(_DETECTOR["det"], CASE, image)


@pytest.mark.goldens
def test_bf16_detector_casts_weights_once():
    """A bf16 Detector's jits run on its layers' weights cast to bf16 once (not in every call): bit for bit what the
    float32 parameters give when each layer casts them itself; biases, BN and the model's own parameters stay
    float32."""
    require_goldens()
    model, classes = golden_model(CASE)
    det = Detector(model, classes, dtype="bfloat16")
    leaves = jax.tree_util.tree_leaves_with_path(det.state)
    dts = {jax.tree_util.keystr(p): x.dtype for p, x in leaves}
    assert dts["['backbone']['conv1']['weight'].value"] == jnp.bfloat16
    assert dts["['roi_head']['bbox_head']['shared_fcs'][0]['weight'].value"] == jnp.bfloat16
    assert dts["['roi_head']['bbox_head']['shared_fcs'][0]['bias'].value"] == jnp.float32
    assert dts["['backbone']['bn1']['weight'].value"] == jnp.float32  # BN is not a compute-dtype layer
    assert sum(d == jnp.bfloat16 for d in dts.values()) > 40
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    g = golden_image(CASE, "coco_test_12510")
    batch = make_batch([g["input_bgr_uint8"]], [g.meta])
    args = (jnp.asarray(batch.images), jnp.asarray(batch.img_shapes), jnp.asarray(batch.scale_factors))
    once = det._predict_boxes(det.state, *args, True)
    each_call = det._predict_boxes(nnx.split(model)[1], *args, True)
    for a, b in zip(jax.tree_util.tree_leaves(once), jax.tree_util.tree_leaves(each_call)):
        np.testing.assert_array_equal(a, b)


# -- training -------------------------------------------------------------------------------------------

def _train_batch(model, hw=(128, 160)):
    """Two crops of the golden photos with a few GT boxes/masks each (static training batch)."""
    from flaxdet.config import final_bbox_head
    from flaxdet.data.transforms import own_pad_shape, pad_ground_truth

    h, w = hw
    rng = np.random.default_rng(0)
    images, gts = [], []
    ncls = final_bbox_head(model.cfg.roi_head).num_classes
    for name in IMAGES[:2]:
        p = golden_image("mask_rcnn_tiny_r18", name)["input_bgr_uint8"]
        images.append(p[:h, :w])
        k = 3
        bw, bh = rng.uniform(16, w / 2, k), rng.uniform(16, h / 2, k)
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1).astype(np.float32)
        masks = np.zeros((k, h, w), np.uint8)
        for j, (a, b, c, d) in enumerate(boxes.astype(int)):
            masks[j, b:d, a:c] = 1
        gts.append(dict(bboxes=boxes, labels=rng.integers(0, ncls, k), masks=masks))
    hp, wp = own_pad_shape((h, w))
    batch = dict(images=np.stack(images), img_shapes=np.array([(h, w)] * 2, np.int32),
                 pad_shapes=np.array([(hp, wp)] * 2, np.int32))
    batch.update(pad_ground_truth(gts, 8, hp, wp))
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _train_step(dtype, steps=1):
    from flaxdet.training.optimizers import make_optimizer
    from flaxdet.training.step import TrainState

    model, _ = golden_model("mask_rcnn_tiny_r18")
    before = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
    tx, _ = make_optimizer("sgd", lr=0.01, steps_per_epoch=100, warmup_iters=0)
    state = TrainState(model, tx, dtype=dtype)
    batch = _train_batch(model)
    logs = [jax.device_get(state.train_step(batch, jax.random.PRNGKey(s))) for s in range(steps)]
    return state, before, [{k: float(v) for k, v in lg.items()} for lg in logs]


@pytest.mark.goldens
def test_bf16_train_step_finite_float32_params():
    require_goldens()
    state, before, logs = _train_step("bfloat16")
    print("bf16 train step:", logs)
    assert all(np.isfinite(v) for v in logs[0].values()), logs
    assert logs[0]["loss"] > 0
    leaves = jax.tree_util.tree_leaves(state.params)
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    floats = [x for x in jax.tree_util.tree_leaves(state.opt_state) if hasattr(x, "dtype")
              and jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    after = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
    moved = sum(not np.array_equal(after[k], before[k]) for k in before if k in after)
    assert moved > 0, "the bf16 step moved no parameter"


@pytest.mark.goldens
@pytest.mark.slow
def test_bf16_train_step_close_to_float32():
    """Same weights, batch and sampler key: bf16 loss terms within BF16_TOLERANCES["bf16.train.loss"] of
    float32 (relative)."""
    require_goldens()
    _, _, l32 = _train_step("float32")
    _, _, l16 = _train_step("bfloat16")
    errs = {k: abs(l16[0][k] - l32[0][k]) / max(abs(l32[0][k]), 1e-2) for k in l32[0] if k.startswith("loss")}
    print("float32:", l32[0], "\nbf16:", l16[0], "\nrelative:", errs)
    assert max(errs.values()) <= BF16_TOLERANCES["bf16.train.loss"].rtol, errs


# -- CLI ------------------------------------------------------------------------------------------------

def test_cli_accepts_dtype():
    from flaxdet.cli import build_parser

    p = build_parser()
    a = p.parse_args(["infer", "--checkpoint", "m", "--images", "a.jpg", "--out", "o", "--dtype", "bfloat16"])
    assert a.dtype == "bfloat16"
    a = p.parse_args(["train", "--checkpoint", "m", "--ann", "a.json", "--out", "o", "--dtype", "bfloat16"])
    assert a.dtype == "bfloat16"
    assert p.parse_args(["infer", "--checkpoint", "m", "--images", "a.jpg", "--out", "o"]).dtype == "float32"
    with pytest.raises(SystemExit):
        p.parse_args(["infer", "--checkpoint", "m", "--images", "a.jpg", "--out", "o", "--dtype", "float16"])
