import jax
import numpy as np
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxdet.config import FPNCfg
from flaxdet.models.necks.fpn import FPN
from flaxdet.parity import tolerance_for
from flaxdet_reference.models.necks.fpn import FPN as RefFPN
from parity_tests.models.common import convert_into, nchw_to_nhwc, nhwc_to_nchw, rel_err


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(start=st.sampled_from([0, 1]), extra=st.sampled_from([False, "on_input", "on_lateral", "on_output"]),
       relu_extra=st.booleans(), num_outs=st.integers(4, 6), h=st.integers(9, 40), w=st.integers(9, 40),
       out=st.sampled_from([8, 16]), seed=st.integers(0, 99))
def test_fpn(start, extra, relu_extra, num_outs, h, w, out, seed):
    chans = (8, 16, 24, 32)
    num_outs = max(num_outs, 4 - start)
    cfg = FPNCfg(in_channels=chans, out_channels=out, num_outs=num_outs, start_level=start, add_extra_convs=extra,
                 relu_before_extra_convs=relu_extra)
    ref = RefFPN(cfg)
    flax = FPN(cfg, rngs=nnx.Rngs(0))
    convert_into("neck", flax, ref, seed)
    rng = np.random.default_rng(seed)
    sizes = [(h, w)]
    for _ in range(3):
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))  # odd sizes: upsample by size=
    xs = [rng.normal(size=(2, c, *s)).astype(np.float32) for c, s in zip(chans, sizes)]
    with torch.no_grad():
        want = ref(tuple(torch.from_numpy(x) for x in xs))
    got = jax.jit(flax)(tuple(nchw_to_nhwc(x) for x in xs))
    assert len(got) == len(want) == num_outs
    for a, b in zip(got, want):
        assert rel_err(nhwc_to_nchw(a), b.numpy()) <= tolerance_for("neck").rtol
