"""Loss/gradient evaluation and the jit-compiled train step (optax), with visdet's frozen parts.

Parameters are split from the rest of the model state (BN running statistics, counters): visdet
trains with ``norm_eval=True`` (BN always uses running stats, never updates them), so only
``nnx.Param`` leaves are differentiated. ``frozen_stages`` parameters are constants of the step
(``stop_gradient``) and their updates are zeroed (weight decay).
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxdet.config import check_trainable
from flaxdet.nn import set_compute_dtype
from flaxdet_converters.convert import flax_variables


def split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def param_keys(graphdef, params, rest):
    """{visdet key: (flat path in params, torch layout permutation or None)}."""
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


def loss_and_grads(model, batch, key, inject=None, with_stages=False, mask_rows=None):
    """(logs, grads as {visdet key: numpy array in torch layout}[, stages]) of ``model.loss`` (its
    ``inject`` and ``mask_rows`` arguments), jitted."""
    graphdef, params, rest = split(model)

    @jax.jit
    def f(params, batch, key, inject):
        def inner(p):
            return nnx.merge(graphdef, p, rest).loss(batch, key, inject, with_stages, mask_rows)
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
    MASK_ROWS_WINDOW = 10  # steps of positives the mask branch's row bucket is chosen from
    # a factor over them; 1: the window's maximum is the margin (demo fine-tune, positives 15-81 rows per
    # image: 1.25 put 121 of 150 steps on the 128-row bucket at 1.15 s/step, 1.0 put 98 on 64 rows at
    # 0.62 s/step; a re-run costs one step, and a compile the first time)
    MASK_ROWS_HEADROOM = 1.0

    def __init__(self, model, tx, step=0, dtype=None):
        check_trainable(model.cfg)
        if dtype is not None:
            set_compute_dtype(model, dtype)
        self.graphdef, self.params, self.rest = split(model)
        self.frozen = frozen_filter(model)
        self.tx = tx
        self.opt_state = tx.init(self.params)
        self.step = step
        self.mask_buckets = model.roi_head.mask_row_buckets()  # None: no mask branch
        self.needed_rows = []  # mask rows per image the recent steps' positives took
        self.reruns = 0  # steps re-run because their positives overflowed the chosen rows
        self.last_mask_rows = None  # the rows the last step's mask branch ran on

    def mask_rows(self):
        """The static mask-branch rows per image for the next step: the smallest bucket holding
        ``MASK_ROWS_HEADROOM`` times the most positive rows of the last ``MASK_ROWS_WINDOW`` steps (the
        smallest before any step: few positives then need one compile, many positives a re-run)."""
        if self.mask_buckets is None:
            return None
        if not self.needed_rows:
            return self.mask_buckets[0]
        return self._bucket(max(self.needed_rows[-self.MASK_ROWS_WINDOW:]))

    def _bucket(self, need):
        need = math.ceil(need * self.MASK_ROWS_HEADROOM)
        return next((k for k in self.mask_buckets if k >= need), self.mask_buckets[-1])

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.rest)

    @partial(jax.jit, static_argnums=(0, 6), donate_argnums=(1, 2))
    def _step(self, params, opt_state, rest, batch, key, mask_rows=None):
        """One update. With ``mask_rows`` set and more rows needed by this step's positives
        (``logs["mask_rows_needed"] > mask_rows``) the step is void: params and optimizer state come
        back unchanged, for the caller to re-run it with more rows."""
        def inner(p):  # frozen parameters are constants here: their gradients are never computed
            return nnx.merge(self.graphdef, stop_frozen(p, self.frozen), rest).loss(batch, key, mask_rows=mask_rows)

        (_, logs), grads = jax.value_and_grad(inner, has_aux=True)(params)  # frozen: exact zeros
        updates, new_opt = self.tx.update(grads, opt_state, params)
        updates = apply_frozen(updates, self.frozen)  # weight decay must not move frozen params either
        new_params = optax.apply_updates(params, updates)
        if mask_rows is not None:
            ok = logs["mask_rows_needed"] <= mask_rows
            keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
            new_params, new_opt = jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state)
        return new_params, new_opt, logs

    def lower(self, batch, key):
        """The step's ``jax.stages.Lowered`` for the rows :meth:`train_step` would use next."""
        return TrainState._step.lower(self, self.params, self.opt_state, self.rest, batch, key, self.mask_rows())

    def __hash__(self):
        return id(self)

    def train_step(self, batch, key):
        """One step (logs as device arrays). Mask models: the mask branch runs on :meth:`mask_rows`
        rows per image, a static shape (one compile per bucket, at most four); a step whose positives
        need more is re-run with the bucket holding them (it changed nothing: see ``_step``)."""
        rows = self.mask_rows()
        while True:
            self.params, self.opt_state, logs = self._step(self.params, self.opt_state, self.rest, batch, key, rows)
            if rows is None:
                break
            need = int(logs.pop("mask_rows_needed"))
            if need <= rows:
                self.needed_rows = (self.needed_rows + [need])[-self.MASK_ROWS_WINDOW:]
                self.last_mask_rows = rows
                break
            self.reruns += 1
            rows = self._bucket(need)
        self.step += 1
        return logs
