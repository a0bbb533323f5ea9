"""CSPNeXtPAFPN (RTMDet's neck) against visdet: the recorded P3-P5 of both RTMDet goldens on all three photos,
fed the recorded backbone outputs, and the full-size presets' parameter counts and output shapes
(visdet-rtmdet.md §1.1, §1.5)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from flaxdet.config import load_config
from flaxdet.models.necks.cspnext_pafpn import CSPNeXtPAFPN
from parity_tests.goldens import IMAGES, golden_image
from parity_tests.models.backbones.test_cspnext import CASES, PRESETS, TOL, golden_module, n_params, scale_rel
from parity_tests.models.common import nchw_to_nhwc

pytestmark = pytest.mark.goldens


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("image", IMAGES)
def test_cspnext_pafpn_golden(case, image):
    _, fn = golden_module(case, "neck", CSPNeXtPAFPN)
    g = golden_image(case, image)
    outs = fn(tuple(nchw_to_nhwc(g[f"backbone.{i}"]) for i in range(3)))
    assert len(outs) == 3
    errs = [scale_rel(o, g[f"neck.{i}"]) for i, o in enumerate(outs)]
    assert max(errs) <= TOL, errs


# preset: (neck params, out_channels, in_channels) from visdet-rtmdet.md §1.1 / §1.5
FULL = {"rtmdet_s": (3_883_200, 128, (128, 256, 512)), "rtmdet_l": (23_746_688, 256, (256, 512, 1024))}


@pytest.mark.parametrize("preset", sorted(FULL))
def test_cspnext_pafpn_full_size(preset):
    cfg = load_config(PRESETS / f"{preset}.yaml").neck
    module = CSPNeXtPAFPN(cfg, rngs=nnx.Rngs(0))
    count, out_c, in_c = FULL[preset]
    assert n_params(module) == count
    strides = (8, 16, 32)
    feats = tuple(jax.ShapeDtypeStruct((1, 320 // s, 416 // s, c), np.float32) for s, c in zip(strides, in_c))
    out = jax.eval_shape(module, feats)
    assert [o.shape for o in out] == [(1, 320 // s, 416 // s, out_c) for s in strides]
