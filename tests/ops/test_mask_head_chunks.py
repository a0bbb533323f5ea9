"""Fast path ``mask_head_chunks``: the inference mask head on chunks of rows equals the one call (float tolerance)."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from flaxdet import fast_paths
from flaxdet.config import FCNMaskHeadCfg
from flaxdet.fast_paths.mask_head_chunks import CHUNK, run_mask_head
from flaxdet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead


def test_chunks_equal_one_call():
    head = FCNMaskHead(FCNMaskHeadCfg(num_convs=2, in_channels=16, conv_out_channels=16, num_classes=3),
                       rngs=nnx.Rngs(0))
    for rows in (CHUNK, CHUNK + 1, 3 * CHUNK + 7):
        x = jax.random.normal(jax.random.key(rows), (rows, 14, 14, 16))
        outs = {}
        for spec in (["mask_head_chunks"], "none"):
            with fast_paths.use(spec):
                jaxpr = str(jax.make_jaxpr(lambda x: run_mask_head(head, x))(x))
                assert ("scan" in jaxpr) == (spec != "none" and rows > CHUNK), (spec, rows)
                outs[str(spec)] = np.asarray(jax.jit(lambda x: run_mask_head(head, x))(x))
        a, b = outs.values()
        assert a.shape == b.shape == (rows, 28, 28, 3)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
