"""Loss/gradient evaluation and the jit-compiled train step (optax), with visdet's frozen parts.

Parameters are split from the rest of the model state (BN running statistics, counters); only ``nnx.Param``
leaves are differentiated. ``frozen_stages`` parameters are constants of the step (``stop_gradient``) and their
updates are zeroed (weight decay).

BatchNorm runs as under visdet's ``model.train()``: in train mode (batch statistics; the running statistics move,
see :class:`flaxdet.nn.BatchNorm2d`) except in the backbone when its ``norm_eval`` is true and in its frozen stages
(``frozen_stages``), which stay in eval mode (:func:`bn_eval_prefixes`). The two-stage family requires
``norm_eval: true`` and has no BN outside the backbone, so none of its BN trains; RTMDet's (``norm_eval: false``,
``frozen_stages: -1``) all do, and with the batch sharded over the ``data`` mesh axis their statistics are over
the global batch (SyncBN). The step returns the updated statistics as the new ``rest``.
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
from flaxdet.nn import BatchNorm2d, GroupNorm, set_bn_training, set_compute_dtype
from flaxdet_converters.convert import flax_variables, variable_aliases


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


def bn_eval_prefixes(model) -> tuple[str, ...]:
    """Dotted module paths whose BN layers visdet keeps in eval mode while training (torch ``model.train()`` then
    the backbone's ``train()`` override): the whole backbone when its ``norm_eval`` is true, else the stem and
    stages up to ``frozen_stages`` (``_freeze_stages`` puts them in eval mode). Everything else trains its BN."""
    bb = model.backbone
    if getattr(bb.cfg, "norm_eval", True):
        return ("backbone",)
    prefixes = tuple(bb.frozen_prefixes()) if hasattr(bb, "frozen_prefixes") else ()
    if not getattr(getattr(bb.cfg, "norm_cfg", None), "requires_grad", True):
        # frozen_prefixes() appends every norm layer (frozen *parameters*); torch still updates their statistics
        norms = sum(isinstance(n, (BatchNorm2d, GroupNorm)) for _, n in nnx.iter_graph(bb))
        prefixes = prefixes[: len(prefixes) - norms]
    return tuple(f"backbone.{p}" for p in prefixes)


def set_train_mode(model, training=True) -> int:
    """Put ``model``'s BN layers in visdet's training mode (see :func:`bn_eval_prefixes`) or back in eval mode, in
    place. Returns the number of BN layers that train."""
    if not training:
        set_bn_training(model, False)
        return 0
    skip = bn_eval_prefixes(model)
    set_bn_training(model, False)
    set_bn_training(model, True, skip=skip)
    return sum(isinstance(m, BatchNorm2d) and not m.use_running_average for _, m in nnx.iter_graph(model))


def trains_bn(model) -> bool:
    """Whether training moves any of ``model``'s BN statistics (without changing ``model``)."""
    skip = bn_eval_prefixes(model)
    return any(isinstance(m, BatchNorm2d) and not any(".".join(map(str, p)) == s or
                                                      ".".join(map(str, p)).startswith(s + ".") for s in skip)
               for p, m in nnx.iter_graph(model))


# --- rematerialisation (jax.checkpoint per stage) -----------------------------------------------------------------
REMAT_MODES = ("none", "auto", "full")
_POLICIES = {"nothing": jax.checkpoint_policies.nothing_saveable,  # keep only the unit's inputs
             "dots": jax.checkpoint_policies.dots_saveable}  # keep convolution/matmul outputs, recompute the rest
# the units ``auto`` rematerialises and how, per JAX backend (None: any other): {unit kind: policy name}, a kind
# left out is not rematerialised. CPU, measured (docs/performance.md "Training memory"): XLA:CPU schedules the
# recomputation without lowering the step's buffers (R50 Mask R-CNN 512x640 batch 2: XLA temp 2850 MB and peak
# RSS 5.2-5.3 GB with or without every unit rematerialised), so auto rematerialises nothing there. Elsewhere
# (GPU/TPU, not measured yet): backbone blocks and neck keep only their inputs, jax.checkpoint's usual trade.
AUTO_REMAT = {"cpu": {}, None: {"backbone": "nothing", "neck": "nothing"}}
FULL_REMAT = {"backbone": "nothing", "neck": "nothing", "head": "nothing"}


def _children(seq):
    return [(str(i), c) for i, c in enumerate(seq)] if isinstance(seq, (list, nnx.List)) else None


def remat_units(model) -> list[tuple[str, str]]:
    """[(dotted module path, unit kind)] of ``model``'s rematerialisable units, none inside another: every block of
    the backbone's trainable stages (ResNet ``layer{i}.{j}``, CSPNeXt ``stem.{j}`` / ``stage{i}.{j}``; frozen
    stages keep no activations for the backward anyway), the neck, and the dense heads / RoI heads' box and mask
    heads (kind ``backbone`` / ``neck`` / ``head``)."""
    out = []
    bb = getattr(model, "backbone", None)
    frozen = set(bb.frozen_prefixes()) if hasattr(bb, "frozen_prefixes") else set()
    names = getattr(bb, "layers", None) or [f"layer{i + 1}" for i in range(getattr(bb, "num_layers", 0))]
    for name in names:
        kids = _children(getattr(bb, name, None))
        if name in frozen or kids is None:
            continue
        out += [(f"backbone.{name}.{i}", "backbone") for i, _ in kids]
    if getattr(model, "neck", None) is not None:
        out.append(("neck", "neck"))
    for head in ("rpn_head", "bbox_head"):
        if getattr(model, head, None) is not None:
            out.append((head, "head"))
    roi = getattr(model, "roi_head", None)
    if roi is not None:  # Cascade: bbox_head / mask_head are lists of per-stage heads
        for name in ("bbox_head", "mask_head"):
            sub = getattr(roi, name, None)
            kids = _children(sub)
            if sub is None:
                continue
            out += ([(f"roi_head.{name}", "head")] if kids is None
                    else [(f"roi_head.{name}.{i}", "head") for i, _ in kids])
    return out


def remat_plan(model, mode="auto") -> tuple[tuple[str, str], ...]:
    """((dotted module path, policy name), ...) that ``mode`` rematerialises in ``model``'s train step: ``none``
    nothing, ``full`` every unit of :func:`remat_units` keeping only its inputs, ``auto`` :data:`AUTO_REMAT` of the
    default backend (CPU: nothing, measured to save no memory there)."""
    if mode not in REMAT_MODES:
        raise ValueError(f"remat must be one of {REMAT_MODES}, not {mode!r}")
    auto = AUTO_REMAT.get(jax.default_backend(), AUTO_REMAT.get(None, {}))
    table = {"none": {}, "auto": auto, "full": FULL_REMAT}[mode]
    return tuple((path, table[kind]) for path, kind in remat_units(model) if kind in table)


_REMAT_CLASSES = {}


def _remat_class(cls, policy):
    """A subclass of ``cls`` whose ``__call__`` runs ``cls.__call__`` under ``nnx.remat`` (``jax.checkpoint``) with
    ``policy``: the backward recomputes what the policy does not save. Variables the call writes (train-mode BN
    statistics) are outputs of the checkpointed function, so they move once per step as without remat."""
    key = (cls, policy)
    if key not in _REMAT_CLASSES:
        base_call = cls.__call__

        def __call__(self, *args, **kwargs):
            inner = nnx.remat(lambda mod, *a: base_call(mod, *a, **kwargs), policy=_POLICIES[policy])
            return inner(self, *args)

        _REMAT_CLASSES[key] = type(cls)(f"Remat{cls.__name__}", (cls,), {"__call__": __call__,
                                                                          "__module__": cls.__module__})
    return _REMAT_CLASSES[key]


def _module_at(model, path):
    m = model
    for name in path.split("."):
        m = m[int(name)] if name.isdigit() else getattr(m, name)
    return m


class remat_applied:
    """``with remat_applied(m, plan):`` the modules of ``plan`` (:func:`remat_plan`) run rematerialised, in place on
    ``m`` (a model merged for one trace); their classes are restored on exit."""

    def __init__(self, model, plan):
        self.mods = [(_module_at(model, path), policy) for path, policy in plan or ()]

    def __enter__(self):
        self.saved = [(m, m.__class__) for m, _ in self.mods]
        for m, policy in self.mods:
            object.__setattr__(m, "__class__", _remat_class(m.__class__, policy))
        return self

    def __exit__(self, *exc):
        for m, cls in self.saved:
            object.__setattr__(m, "__class__", cls)
        return False


def _train_loss(graphdef, params, rest, train_bn, *args, remat=None):
    """``model.loss(*args)`` on the merged model, BN in training mode when ``train_bn``, the modules of the
    ``remat`` plan (:func:`remat_plan`) rematerialised; returns (total, (logs, new rest)): the rest with the
    statistics the train-mode BN layers moved (``rest`` itself otherwise)."""
    m = nnx.merge(graphdef, params, rest, copy=True)  # fresh variables of this trace: train-mode BN writes them
    if train_bn:
        set_train_mode(m)
    with remat_applied(m, remat):
        total, aux = m.loss(*args)
    new_rest = nnx.split(m, nnx.Param, ...)[2] if train_bn else rest
    return total, (aux, new_rest)


def state_dict_of(graphdef, params, rest, which=None) -> dict:
    """{visdet key: numpy array in torch layout} of the merged state's variables, a shared variable under each of
    its keys (``which``: a variable type such as ``nnx.BatchStat``; None: every non-Param variable)."""
    keep = (lambda v: not isinstance(v, nnx.Param)) if which is None else (lambda v: isinstance(v, which))  # noqa: E731
    m = nnx.merge(graphdef, params, rest)
    aliases = variable_aliases(m)
    out = {}
    for key, var, owner in flax_variables(m):
        if keep(var):
            v = np.asarray(var.get_value())
            perm = getattr(type(owner), "TORCH_LAYOUT", {}).get(key.rsplit(".", 1)[-1])
            out[key] = np.transpose(v, np.argsort(perm)) if perm is not None else v
            for alias in aliases.get(key, ()):
                out[alias] = out[key]
    return out


def loss_and_grads(model, batch, key, inject=None, with_stages=False, mask_rows=None, with_state=False,
                   train_bn=True, remat="none"):
    """(logs, grads as {visdet key: numpy array in torch layout}[, stages][, state]) of ``model.loss`` (its
    ``inject`` and ``mask_rows`` arguments), jitted. ``train_bn``: BN as in training (:func:`set_train_mode`; the
    two-stage family's BN never trains); ``model`` itself is not changed. ``with_state``: also the model's
    non-parameter variables after the step ({visdet key: numpy}: BN running statistics and
    ``num_batches_tracked``, moved by the train-mode BN layers). ``remat``: ``none`` / ``auto`` / ``full``
    (:func:`remat_plan`; the values are the same, the memory and time differ)."""
    plan = remat_plan(model, remat)
    graphdef, params, rest = split(model)
    train_bn = train_bn and trains_bn(model)

    @jax.jit
    def f(params, rest, batch, key, inject):
        inner = lambda p: _train_loss(graphdef, p, rest, train_bn, batch, key, inject, with_stages, mask_rows,  # noqa: E731
                                      remat=plan)
        return jax.value_and_grad(inner, has_aux=True)(params)

    (_, (aux, new_rest)), grads = f(params, rest, batch, key, inject)
    logs, stages = aux if with_stages else (aux, None)
    layouts = param_keys(graphdef, params, rest)
    flat = {".".join(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(grads)}
    torch_grads = {k: (np.transpose(flat[k], np.argsort(perm)) if perm is not None else flat[k])
                   for k, perm in layouts.items()}
    logs = {k: float(v) for k, v in logs.items()}
    out = (logs, torch_grads) + ((stages,) if with_stages else ())
    return out + (state_dict_of(graphdef, params, new_rest),) if with_state else out


def mask_row_buckets(model):
    """The model's mask-branch row buckets (None: no mask branch): the detector's own, else its RoI head's."""
    fn = getattr(model, "mask_row_buckets", None)
    if fn is None and hasattr(model, "roi_head"):
        fn = model.roi_head.mask_row_buckets
    return fn() if fn is not None else None


class TrainState:
    """params + optimizer state + rest (+ the EMA), with a jit-compiled, buffer-donating step.

    ``dtype``: compute dtype of the convolutions and matmuls ("bfloat16": mixed precision; "float32";
    None keeps the model's, see :func:`flaxdet.nn.set_compute_dtype`, set in place on ``model``). The
    parameters, their gradients and the optimizer state stay float32 whatever the compute dtype: the
    layers cast their float32 weights to the compute dtype inside the step, so the gradient of that
    cast returns float32 gradients (bf16 products, float32 accumulation).

    BN layers run in visdet's training mode inside the step (:func:`set_train_mode`; ``model`` and
    :meth:`model` stay in eval mode) and ``rest`` holds their moved statistics after each step. ``ema``: an
    :class:`~flaxdet.training.ema.EMAConfig` to keep an average of the weights (:meth:`ema_model`).

    ``remat``: rematerialisation of the step's activations (:func:`remat_plan`): ``none`` keeps every activation
    the backward needs, ``full`` keeps only each unit's inputs (backbone blocks, neck, heads) and recomputes the
    rest in the backward, ``auto`` (default) the per-unit policies chosen by measurement. Same losses, gradients
    and BN statistics in every mode."""
    MASK_ROWS_WINDOW = 10  # steps of positives the mask branch's row bucket is chosen from
    # a factor over them; 1: the window's maximum is the margin (demo fine-tune, positives 15-81 rows per
    # image: 1.25 put 121 of 150 steps on the 128-row bucket at 1.15 s/step, 1.0 put 98 on 64 rows at
    # 0.62 s/step; a re-run costs one step, and a compile the first time)
    MASK_ROWS_HEADROOM = 1.0

    def __init__(self, model, tx, step=0, dtype=None, ema=None, remat="auto"):
        from flaxdet.training.ema import EMA

        check_trainable(model.cfg)
        if dtype is not None:
            set_compute_dtype(model, dtype)
        set_train_mode(model, False)
        self.train_bn = trains_bn(model)
        self.remat = remat_plan(model, remat)  # ((module path, policy), ...): static in the step
        self.graphdef, params, rest = split(model)
        # own buffers: the step donates them, and ``model`` stays usable
        self.params, self.rest = jax.tree.map(jnp.array, params), jax.tree.map(jnp.array, rest)
        self.frozen = frozen_filter(model)
        self.tx = tx
        self.opt_state = tx.init(self.params)
        self.step = step
        self.ema = EMA(model, self.params, self.rest, ema) if ema is not None else None
        self.mask_buckets = mask_row_buckets(model)  # None: no mask branch
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
        """The trained model (BN in eval mode)."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def ema_model(self):
        """The model with the EMA weights (None without EMA)."""
        return nnx.merge(self.graphdef, self.ema.params, self.ema.rest) if self.ema is not None else None

    def state_dict(self, which=None):
        """{visdet key: numpy} of the model's non-parameter variables now (BN statistics, counters)."""
        return state_dict_of(self.graphdef, self.params, self.rest, which)

    @partial(jax.jit, static_argnums=(0, 6), donate_argnums=(1, 2, 3))
    def _step(self, params, opt_state, rest, batch, key, mask_rows=None):
        """One update. With ``mask_rows`` set and more rows needed by this step's positives
        (``logs["mask_rows_needed"] > mask_rows``) the step is void: params, optimizer state and BN statistics
        come back unchanged, for the caller to re-run it with more rows."""
        def inner(p):  # frozen parameters are constants here: their gradients are never computed
            return _train_loss(self.graphdef, stop_frozen(p, self.frozen), rest, self.train_bn, batch, key, None,
                               False, mask_rows, remat=self.remat)

        (_, (logs, new_rest)), grads = jax.value_and_grad(inner, has_aux=True)(params)  # frozen: exact zeros
        updates, new_opt = self.tx.update(grads, opt_state, params)
        updates = apply_frozen(updates, self.frozen)  # weight decay must not move frozen params either
        new_params = optax.apply_updates(params, updates)
        if mask_rows is not None:
            ok = logs["mask_rows_needed"] <= mask_rows
            keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
            new_params, new_opt = jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state)
            new_rest = jax.tree.map(keep, new_rest, rest)
        return new_params, new_opt, new_rest, logs

    def lower(self, batch, key):
        """The step's ``jax.stages.Lowered`` for the rows :meth:`train_step` would use next."""
        return TrainState._step.lower(self, self.params, self.opt_state, self.rest, batch, key, self.mask_rows())

    def __hash__(self):
        return id(self)

    def train_step(self, batch, key):
        """One step (logs as device arrays). Mask models: the mask branch runs on :meth:`mask_rows`
        rows per image, a static shape (one compile per bucket, at most four); a step whose positives
        need more is re-run with the bucket holding them (it changed nothing: see ``_step``). With an EMA, the
        average is updated after the step."""
        rows = self.mask_rows()
        while True:
            self.params, self.opt_state, self.rest, logs = self._step(self.params, self.opt_state, self.rest, batch,
                                                                      key, rows)
            if rows is None:
                break
            need = int(logs.pop("mask_rows_needed"))
            if need <= rows:
                self.needed_rows = (self.needed_rows + [need])[-self.MASK_ROWS_WINDOW:]
                self.last_mask_rows = rows
                break
            self.reruns += 1
            rows = self._bucket(need)
        if self.ema is not None:
            self.ema.update(self.params, self.rest)
        self.step += 1
        return logs
