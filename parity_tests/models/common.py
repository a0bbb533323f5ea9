"""Module-level parity helpers: build the reference (torch) and flaxdet twin of one module from the
same config dataclass, move the torch module's seeded weights with the production converter, run both."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flaxdet_converters.convert import load_visdet_state_dict


def seeded(module: torch.nn.Module, seed: int) -> dict:
    """Well-conditioned seeded weights (He-normal, BN stats near identity), loaded into ``module``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.75
        elif k.endswith(("running_mean", "bias")):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("num_batches_tracked") or not v.is_floating_point():
            sd[k] = v  # integer state (BN counters, Swin's relative_position_index) is not a weight
        elif k.endswith("weight") and v.ndim == 1:
            sd[k] = 1 + torch.randn(v.shape, generator=g) * 0.1
        else:
            fan_in = v[0].numel() if v.ndim > 1 else 1
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    module.load_state_dict(sd)
    return {k: v.numpy() for k, v in sd.items()}


class Holder(nnx.Module):
    """Wraps a flaxdet module under ``name`` so converted keys keep visdet's prefix."""

    def __init__(self, name, module):
        setattr(self, name, module)


def convert_into(name, flax_module, torch_module, seed):
    sd = seeded(torch_module.eval(), seed)
    report = load_visdet_state_dict(Holder(name, flax_module), {f"{name}.{k}": v for k, v in sd.items()})
    assert report.ok, report.summary()
    return sd


def nchw_to_nhwc(x):
    return jnp.asarray(np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1)))


def nhwc_to_nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))
