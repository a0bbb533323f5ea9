"""Loss/gradient evaluation and the jit-compiled train step (optax), with visdet's frozen parts.

Parameters are split from the rest of the model state (BN running statistics, counters): visdet
trains with ``norm_eval=True`` (BN always uses running stats, never updates them), so only
``nnx.Param`` leaves are differentiated. ``frozen_stages`` parameters get no update (their
gradients are zeroed through ``optax.masked``-style multiplication by a static mask).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet.training.forward import loss_fn


def split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def param_keys(graphdef, params, rest):
    """{visdet key: (flat path in params, torch layout permutation or None)}."""
    from flaxdet_converters.convert import flax_variables

    m = nnx.merge(graphdef, params, rest)
    out = {}
    for key, var, owner in flax_variables(m):
        if isinstance(var, nnx.Param):
            out[key] = getattr(type(owner), "TORCH_LAYOUT", {}).get(key.rsplit(".", 1)[-1])
    return out


def _path_names(path):
    return [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]


def frozen_filter(model):
    """A function (tree path) -> 0.0 for parameters visdet freezes (frozen_stages), else 1.0."""
    prefixes = set(model.backbone.frozen_prefixes()) if hasattr(model.backbone, "frozen_prefixes") else set()

    def factor(path):  # a prefix is dotted ("layer1", "stages.0"): it matches whole leading names
        names = _path_names(path)
        if len(names) < 2 or names[0] != "backbone":
            return 1.0
        dotted = ".".join(names[1:]) + "."
        return 0.0 if any(dotted.startswith(p + ".") for p in prefixes) else 1.0

    return factor


def apply_frozen(tree, factor):
    return jax.tree_util.tree_map_with_path(lambda p, x: x * factor(p) if factor(p) != 1.0 else x, tree)


def stop_frozen(tree, factor):
    """``stop_gradient`` on the parameters ``factor`` freezes: XLA then drops their weight-gradient
    convolutions (the stem and ``layer1`` of an R50 at stride 2/4 are the largest maps of the step)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: jax.lax.stop_gradient(x) if factor(p) == 0.0 else x, tree)


def loss_and_grads(model, batch, key, inject=None, with_stages=False):
    """(logs, grads as {visdet key: numpy array in torch layout}[, stages])."""
    graphdef, params, rest = split(model)

    @jax.jit
    def f(params, batch, key, inject):
        def inner(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, key, inject, with_stages=with_stages)
        return jax.value_and_grad(inner, has_aux=True)(params)

    (_, aux), grads = f(params, batch, key, inject)
    logs, stages = aux if with_stages else (aux, None)
    layouts = param_keys(graphdef, params, rest)
    flat = {".".join(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(grads)}
    torch_grads = {k: (np.transpose(flat[k], np.argsort(perm)) if perm is not None else flat[k])
                   for k, perm in layouts.items()}
    logs = {k: float(v) for k, v in logs.items()}
    return (logs, torch_grads, stages) if with_stages else (logs, torch_grads)


class TrainState:
    """params + optimizer state + rest, with a jit-compiled, buffer-donating step.

    ``dtype``: compute dtype of the convolutions and matmuls ("bfloat16": mixed precision; "float32";
    None keeps the model's, see :func:`flaxdet.nn.set_compute_dtype`, set in place on ``model``). The
    parameters, their gradients and the optimizer state stay float32 whatever the compute dtype: the
    layers cast their float32 weights to the compute dtype inside the step, so the gradient of that
    cast returns float32 gradients (bf16 products, float32 accumulation)."""

    def __init__(self, model, tx, step=0, dtype=None):
        if dtype is not None:
            from flaxdet.nn import set_compute_dtype

            set_compute_dtype(model, dtype)
        self.graphdef, self.params, self.rest = split(model)
        self.frozen = frozen_filter(model)
        self.tx = tx
        self.opt_state = tx.init(self.params)
        self.step = step

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.rest)

    @partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
    def _step(self, params, opt_state, rest, batch, key):
        import optax

        def inner(p):  # frozen parameters are constants here: their gradients are never computed
            return loss_fn(nnx.merge(self.graphdef, stop_frozen(p, self.frozen), rest), batch, key)

        (_, logs), grads = jax.value_and_grad(inner, has_aux=True)(params)  # frozen: exact zeros
        updates, opt_state = self.tx.update(grads, opt_state, params)
        updates = apply_frozen(updates, self.frozen)  # weight decay must not move frozen params either
        return optax.apply_updates(params, updates), opt_state, logs

    def __hash__(self):
        return id(self)

    def train_step(self, batch, key):
        self.params, self.opt_state, logs = self._step(self.params, self.opt_state, self.rest, batch, key)
        self.step += 1
        return logs
