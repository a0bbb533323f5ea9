"""Fast path ``image_loop``: the inference trunk image by image gives a batch the same detections as the whole
batch at once, and each image those it gets alone."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdet import fast_paths
from flaxdet.fast_paths.image_loop import per_image


def _fn(x, pair):
    a, b = pair
    return {"sum": x.sum(axis=(1, 2)) + a, "stack": [x * 2, b[:, None, :] + x]}


def test_per_image_equals_the_batch_and_maps_only_batches():
    x = jax.random.normal(jax.random.key(0), (3, 4, 5))
    pair = (jnp.arange(3.0), jnp.ones((3, 5)))
    outs = {}
    for spec in (["image_loop"], "none"):
        with fast_paths.use(spec):
            jaxpr = str(jax.make_jaxpr(lambda x, p: per_image(_fn, x, p))(x, pair))
            assert ("scan" in jaxpr) == (spec != "none")
            outs[str(spec)] = jax.jit(lambda x, p: per_image(_fn, x, p))(x, pair)
            one = str(jax.make_jaxpr(lambda x, p: per_image(_fn, x, p))(x[:1], jax.tree.map(lambda t: t[:1], pair)))
            assert "scan" not in one  # a batch of one is called as it is
    for a, b in zip(jax.tree.leaves(outs["['image_loop']"]), jax.tree.leaves(outs["none"])):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with fast_paths.use(["image_loop"]), pytest.raises(ValueError, match="batch axis 3"):
        per_image(_fn, x, (jnp.arange(3.0), jnp.ones((2, 5))))


@pytest.mark.goldens
@pytest.mark.parametrize("case", [pytest.param("mask_rcnn_tiny_r18", marks=pytest.mark.slow), "rtmdet/rtmdet_ins_tiny"])
def test_batch_detections_are_each_images_alone(case):
    """The golden tiny models (Mask R-CNN; RTMDet-Ins: the one-stage trunk and head) on a recorded photo and its
    mirror image in one batch: on the fast path each image's detections and masks are those of a batch of its own
    (bit for bit); off it, the whole batch's convolutions can round differently (RTMDet-Ins tiny here: boxes
    within ~1e-3 px), so the two paths agree to float tolerance. (Images of different padded sizes in one batch get
    other detections than alone, as in visdet: the smaller one is padded.)"""
    from flaxdet.config import load_config
    from flaxdet.inference import Detector
    from flaxdet.models import build_detector
    from flaxdet_converters.checkpoint_io import load_checkpoint
    from flaxdet_converters.convert import load_visdet_state_dict
    from parity_tests.goldens import config_path, golden_image

    model = build_detector(load_config(str(config_path(case))))
    load_visdet_state_dict(model, load_checkpoint(config_path(case).parent / "checkpoint.pth").state_dict)
    det = Detector(model)
    g = golden_image(case, "coco_test_12510")
    imgs, metas = [g["input_bgr_uint8"], np.ascontiguousarray(g["input_bgr_uint8"][:, ::-1])], [g.meta] * 2
    others = fast_paths.active() - {"image_loop"}
    runs = {}
    for name, spec in (("loop", others | {"image_loop"}), ("batch", others)):
        with fast_paths.use(spec):
            runs[name] = det.detect(imgs, metas)
            if name == "loop":
                alone = [det.detect([im], [m])[0] for im, m in zip(imgs, metas)]
    for loop, batch, one in zip(runs["loop"], runs["batch"], alone):
        assert len(loop["scores"]) > 0 and loop["masks"].any()
        for k in ("bboxes", "scores", "labels", "masks"):
            np.testing.assert_array_equal(loop[k], one[k])
        np.testing.assert_array_equal(loop["labels"], batch["labels"])
        np.testing.assert_allclose(loop["bboxes"], batch["bboxes"], atol=1e-2)
        np.testing.assert_allclose(loop["scores"], batch["scores"], atol=1e-5)
        assert (loop["masks"] != batch["masks"]).mean() < 1e-4
