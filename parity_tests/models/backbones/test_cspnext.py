"""CSPNeXt (RTMDet's backbone) against visdet: the recorded C3-C5 of both RTMDet goldens on all three photos
(weights from the golden state_dict by the production converter), and the full-size presets' parameter counts and
output shapes (visdet-rtmdet.md §1.1, §1.5)."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from flaxdet.config import load_config
from flaxdet.models.backbones.cspnext import CSPNeXt
from flaxdet_converters.checkpoint_io import load_checkpoint
from flaxdet_converters.convert import load_visdet_state_dict
from parity_tests.goldens import GOLDENS, IMAGES, golden_image
from parity_tests.models.common import Holder, nchw_to_nhwc, nhwc_to_nchw

pytestmark = pytest.mark.goldens

CASES = ("rtmdet/rtmdet_tiny", "rtmdet/rtmdet_ins_tiny")
PRESETS = GOLDENS.parent / "visdet-configs" / "models"  # visdet's own presets, beside the goldens
# Scale-relative, float32 summation order only. Observed <= 1.03e-5 (C5 of rtmdet_ins_tiny, coco; elsewhere <= 4.5e-6):
# the golden itself is as far (7.0e-6) from a float64 run of this module -- C5 amplifies float32 rounding.
TOL = 2e-5


def scale_rel(got_nhwc, want_nchw):
    """max |a - b| / max |golden|."""
    a, b = nhwc_to_nchw(got_nhwc).astype(np.float64), np.asarray(want_nchw, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


@functools.cache
def golden_module(case, part, cls):
    """``part`` ("backbone" / "neck") of the golden model, built from its config.yaml and filled (strictly) from
    the ``part.*`` keys of its state_dict -- the converter's own name mapping, under a ``part`` holder."""
    cfg = getattr(load_config(GOLDENS / case / "config.yaml"), part)
    module = cls(cfg, rngs=nnx.Rngs(0))
    sd = load_checkpoint(GOLDENS / case / "state_dict.pth").state_dict
    report = load_visdet_state_dict(Holder(part, module), {k: v for k, v in sd.items() if k.startswith(part + ".")})
    assert report.ok and report.converted, report.summary()
    return module, jax.jit(module)


def n_params(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("image", IMAGES)
def test_cspnext_golden(case, image):
    _, fn = golden_module(case, "backbone", CSPNeXt)
    g = golden_image(case, image)
    outs = fn(nchw_to_nhwc(g["preprocessed"]))
    assert len(outs) == 3
    errs = [scale_rel(o, g[f"backbone.{i}"]) for i, o in enumerate(outs)]
    assert max(errs) <= TOL, errs


# preset: (backbone params, C3-C5 widths) from visdet-rtmdet.md §1.1 / §1.5
FULL = {"rtmdet_s": (4_378_320, (128, 256, 512)), "rtmdet_l": (26_138_912, (256, 512, 1024))}


@pytest.mark.parametrize("preset", sorted(FULL))
def test_cspnext_full_size(preset):
    cfg = load_config(PRESETS / f"{preset}.yaml").backbone
    module = CSPNeXt(cfg, rngs=nnx.Rngs(0))
    count, widths = FULL[preset]
    assert n_params(module) == count
    out = jax.eval_shape(module, jax.ShapeDtypeStruct((1, 320, 416, 3), np.float32))
    assert [o.shape for o in out] == [(1, 320 // s, 416 // s, c) for s, c in zip((8, 16, 32), widths)]
