"""An exponential moving average of the weights, as upstream RTMDet trains (MMDetection's ``ExpMomentumEMA`` run by
mmengine's ``EMAHook(momentum=0.0002, update_buffers=True)``, ``gamma=2000``).

mmengine's ``BaseAveragedModel.update_parameters`` after every optimizer step, with ``t`` its update count:

* ``t == 0``: every entry (parameters and buffers: BN running statistics too) is copied from the model;
* ``t >= 1``: ``m = (1 - momentum) * exp(-(1 + t) / gamma) + momentum`` and, for float entries only,
  ``ema.mul_(1 - m).add_(theta, alpha=m)`` -- ``ema = (1 - m) * ema + m * theta``.

**Tied tensors** (``per_alias``, the default, for parity with upstream): with ``update_buffers=True`` mmengine walks
``state_dict()``, which names a shared tensor once per alias, and lerps the same storage once per name: a visdet
RTMDet head conv shared by the three levels (``share_conv``) moves ``1 - (1 - m)^3`` per update, upstream's tied
RTMDet-Ins cls/reg tower conv ``1 - (1 - m)^6`` and its BNs ``1 - (1 - m)^2``. flaxdet does the same: a variable
reachable under k visdet keys (:func:`flaxdet_converters.convert.variable_aliases`) is lerped k times.
``per_alias=False`` lerps each tensor once (the textbook EMA).

**Integer entries** (``num_batches_tracked``) are copied from the model at every update; mmengine leaves them at
their step-0 copy. Nothing reads them while BN has a momentum (every preset), so no number differs.

The averaged weights are what validation, the final ``model/`` directory and export use when the EMA is on, and
they are checkpointed with the training state (a resumed run continues the same average).
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet_converters.convert import variable_aliases


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    """``ExpMomentumEMA``'s settings (upstream RTMDet's values by default)."""

    momentum: float = 2e-4
    gamma: float = 2000.0
    per_alias: bool = True  # lerp a tied tensor once per visdet key, as mmengine does (see the module docstring)

    def __post_init__(self):
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1), got {self.momentum}")
        if self.gamma <= 0:
            raise ValueError(f"EMA gamma must be > 0, got {self.gamma}")


def ema_momentum(t: int, momentum: float = 2e-4, gamma: float = 2000.0) -> float:
    """``ExpMomentumEMA.avg_func``'s momentum at update ``t`` (>= 1), in float64 as mmengine computes it."""
    return (1 - momentum) * math.exp(-float(1 + t) / gamma) + momentum


def alias_counts(model) -> dict:
    """{visdet key: how many visdet keys name that variable} for the variables of ``model`` named by several keys
    (shared modules); any other key counts 1."""
    counts = {}
    for first, others in variable_aliases(model).items():
        for k in (first, *others):
            counts[k] = 1 + len(others)
    return counts


def _key(path):
    """The visdet key of an ``nnx.State`` leaf path (``(..., 'weight', .value)`` -> ``'....weight'``)."""
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return ".".join(names)


def counts_like(tree, counts: dict, per_alias: bool = True):
    """A list of per-leaf lerp counts in ``jax.tree.leaves(tree)`` order (``tree``: an ``nnx.State``)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append(counts.get(_key(path), 1) if per_alias else 1)
    return out


class EMA:
    """The averaged copy of a model's state (``nnx.State`` trees of parameters and the rest), updated after each
    optimizer step by :meth:`update` (jit-compiled, buffer-donating). ``steps``: updates so far (host int)."""

    def __init__(self, model, params, rest, cfg: EMAConfig | None = None):
        self.cfg = cfg or EMAConfig()
        counts = alias_counts(model)
        self.counts = (tuple(counts_like(params, counts, self.cfg.per_alias)),
                       tuple(counts_like(rest, counts, self.cfg.per_alias)))
        self.params = jax.tree.map(jnp.array, params)  # its own buffers (the step donates the model's)
        self.rest = jax.tree.map(jnp.array, rest)
        self.steps = 0

    def coefficients(self, t: int):
        """(keep, take) = float32 (1 - m, m) for update ``t`` (>= 1), from the float64 momentum as torch casts the
        Python scalars of ``mul_`` / ``add_(alpha=)``."""
        m = ema_momentum(t, self.cfg.momentum, self.cfg.gamma)
        return np.float32(1 - m), np.float32(m)

    def update(self, params, rest):
        """Fold the model's new ``params`` / ``rest`` into the average (step 0: copy)."""
        if self.steps == 0:
            self.params, self.rest = jax.tree.map(jnp.array, params), jax.tree.map(jnp.array, rest)
        else:
            keep, take = self.coefficients(self.steps)
            self.params, self.rest = _lerp(self.counts, self.params, self.rest, params, rest, keep, take)
        self.steps += 1

    def state(self):
        """The checkpointed form: {"params", "rest", "steps"}."""
        return {"params": self.params, "rest": self.rest, "steps": np.asarray(self.steps, np.int32)}

    def load_state(self, state):
        self.params, self.rest, self.steps = state["params"], state["rest"], int(np.asarray(state["steps"]))


@partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _lerp(counts, ema_params, ema_rest, params, rest, keep, take):
    def tree(ema, src, ks):
        leaves, treedef = jax.tree.flatten(ema)
        new = []
        for e, s, k in zip(leaves, jax.tree.leaves(src), ks, strict=True):
            if jnp.issubdtype(e.dtype, jnp.floating):
                for _ in range(k):  # mmengine: one in-place lerp per state_dict name of the tensor
                    e = e * keep.astype(e.dtype) + s * take.astype(e.dtype)
            else:
                e = s  # counters: the model's (see the module docstring)
            new.append(e)
        return jax.tree.unflatten(treedef, new)

    return tree(ema_params, params, counts[0]), tree(ema_rest, rest, counts[1])


def merged(graphdef, ema: EMA):
    """The model with the averaged weights (BN in eval mode, as the graphdef holds it)."""
    return nnx.merge(graphdef, ema.params, ema.rest)
