"""SwinTransformer module parity: flaxdet (jit) vs reference/ on small random Swin configs -- 1 to 4 stages,
depths 1-3, 1/2/4 heads, windows 3-7, patch 2-4, image sizes that are not multiples of the patch or
window (so every padding path runs, and windows larger than the map), batch 2. Float32 tolerance:
TOLERANCES['backbone']."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxdet.config import ConfigError, SwinTransformerCfg
from flaxdet.models.backbones.swin import SwinTransformer, shifted_window_mask, window_relative_index
from flaxdet.parity import tolerance_for
from flaxdet_reference.models.backbones.swin import SwinTransformer as RefSwin
from flaxdet_reference.models.backbones.swin import relative_position_index, shift_attention_mask
from parity_tests.models.common import convert_into, nchw_to_nhwc, nhwc_to_nchw, rel_err


@st.composite
def swin_cfgs(draw):
    n = draw(st.integers(1, 4))
    patch = draw(st.sampled_from([2, 3, 4]))
    outs = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    return SwinTransformerCfg(
        embed_dims=draw(st.sampled_from([8, 12, 16])), patch_size=patch, strides=(patch,) + (2,) * (n - 1),
        depths=tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))),
        num_heads=tuple(draw(st.lists(st.sampled_from([1, 2, 4]), min_size=n, max_size=n))),
        window_size=draw(st.integers(3, 7)), mlp_ratio=draw(st.sampled_from([2, 4])),
        qkv_bias=draw(st.booleans()), patch_norm=draw(st.booleans()), out_indices=tuple(sorted(outs)),
        drop_path_rate=draw(st.sampled_from([0.0, 0.3])), qk_scale=draw(st.sampled_from([None, 0.25])))


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=swin_cfgs(), h=st.integers(17, 75), w=st.integers(17, 75), seed=st.integers(0, 99))
def test_swin(cfg, h, w, seed):
    ref = RefSwin(cfg)
    flax = SwinTransformer(cfg, rngs=nnx.Rngs(0))
    convert_into("backbone", flax, ref, seed)
    x = np.random.default_rng(seed).normal(size=(2, 3, h, w)).astype(np.float32)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x))
    got = jax.jit(flax)(nchw_to_nhwc(x))
    assert len(got) == len(want) == len(cfg.out_indices)
    tol = tolerance_for("backbone").rtol
    for i, (a, b) in enumerate(zip(got, want)):
        assert nhwc_to_nchw(a).shape == tuple(b.shape), (i, a.shape, b.shape)
        assert rel_err(nhwc_to_nchw(a), b.numpy()) <= tol, (i, rel_err(nhwc_to_nchw(a), b.numpy()))


@pytest.mark.parametrize("window", [3, 4, 5, 7])
def test_shapes_only_helpers_agree(window):
    """The independently written index/mask builders of reference/ and flaxdet agree."""
    np.testing.assert_array_equal(window_relative_index(window, window), relative_position_index(window, window))
    for hp, wp in [(window, window), (2 * window, 3 * window), (4 * window, window)]:
        for shift in range(1, window):
            np.testing.assert_array_equal(shifted_window_mask(hp, wp, window, shift),
                                          shift_attention_mask(hp, wp, window, shift))


def test_drop_path_is_training_only():
    cfg = SwinTransformerCfg(embed_dims=8, depths=(2, 2), num_heads=(1, 2), strides=(4, 2), out_indices=(0, 1),
                             window_size=3, drop_path_rate=0.5)
    m = SwinTransformer(cfg, rngs=nnx.Rngs(0))
    plain = SwinTransformer(dataclasses.replace(cfg, drop_path_rate=0.0), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(m))  # the same weights, no stochastic depth
    x = np.random.default_rng(0).normal(size=(4, 24, 20, 3)).astype(np.float32)
    a = jax.jit(lambda x: m(x))(x)
    # no key: eval, the blocks' residual branches all kept
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(jax.jit(lambda x: plain(x))(x)[1]))
    c = jax.jit(lambda x, k: m(x, k))(x, jax.random.key(1))
    assert not np.allclose(np.asarray(c[1]), np.asarray(a[1]))


def test_frozen_stages():
    cfg = SwinTransformerCfg(embed_dims=8, depths=(1, 1, 1), num_heads=(1, 1, 1), strides=(4, 2, 2),
                             out_indices=(0, 2), window_size=3, frozen_stages=2)
    assert SwinTransformer(cfg, rngs=nnx.Rngs(0)).frozen_prefixes() == ("patch_embed", "norm0", "stages.0",
                                                                         "stages.1")
    ref = RefSwin(cfg).train()
    frozen = {k for k, p in ref.named_parameters() if not p.requires_grad}
    assert frozen and all(k.startswith(("patch_embed.", "norm0.", "stages.0.", "stages.1.")) for k in frozen)
    assert not ref.stages[0].training and ref.stages[2].training


def test_config_checks():
    with pytest.raises(ConfigError, match="divisible"):
        SwinTransformerCfg(embed_dims=12, num_heads=(5, 6, 12, 24))
    with pytest.raises(ConfigError, match="patch_size"):
        SwinTransformerCfg(patch_size=4, strides=(2, 2, 2, 2))
    with pytest.raises(ConfigError, match="one entry per stage"):
        SwinTransformerCfg(depths=(2, 2), num_heads=(3, 6, 12))
