import jax
import numpy as np
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxdet.config import ResNetCfg
from flaxdet.models.backbones.resnet import ResNet
from flaxdet.parity import tolerance_for
from flaxdet_reference.models.backbones.resnet import ResNet as RefResNet
from parity_tests.models.common import convert_into, nchw_to_nhwc, nhwc_to_nchw, rel_err


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(depth=st.sampled_from([18, 34, 50, 101]), base=st.sampled_from([4, 8]),
       style=st.sampled_from(["pytorch", "caffe"]), deep_stem=st.booleans(), avg_down=st.booleans(),
       h=st.integers(33, 90), w=st.integers(33, 90), seed=st.integers(0, 99))
def test_resnet(depth, base, style, deep_stem, avg_down, h, w, seed):
    cfg = ResNetCfg(depth=depth, base_channels=base, style=style, deep_stem=deep_stem, avg_down=avg_down,
                    stem_channels=2 * base if deep_stem else None)
    ref = RefResNet(cfg)
    flax = ResNet(cfg, rngs=nnx.Rngs(0))
    convert_into("backbone", flax, ref, seed)
    x = np.random.default_rng(seed).normal(size=(2, 3, h, w)).astype(np.float32)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x))
    got = jax.jit(flax)(nchw_to_nhwc(x))
    tol = tolerance_for("backbone").rtol
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(nhwc_to_nchw(a), b.numpy()) <= tol, (i, rel_err(nhwc_to_nchw(a), b.numpy()))
