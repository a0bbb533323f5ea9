"""Optimizers as visdet (and upstream RTMDet) define them (optax).

* ``sgd`` = visdet's 1x schedule: SGD momentum 0.9, weight decay 1e-4, LinearLR warm-up from 0.001 over 500
  iterations, MultiStepLR x0.1 at epochs 8 and 11; lr 0.02 for batch 16.
* ``adamw`` = ``configs/optimizers/adamw_default.yaml``, what visdet's SimpleRunner trains every model with (RTMDet
  too): lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.05 on every parameter, constant -- after an optional
  linear warm-up from 0.001 over ``warmup_iters`` (default 0: none, as visdet).
* ``rtmdet_adamw`` = upstream MMDetection's RTMDet recipe (``configs/rtmdet/rtmdet_l_8xb32-300e_coco.py``): AdamW
  lr 0.004, weight decay 0.05 except on norm weights/biases and on every bias (``paramwise_cfg``
  ``norm_decay_mult=0, bias_decay_mult=0``), LinearLR warm-up from 1e-5 over the first 1000 iterations, then
  cosine annealing to 0.05 x lr over the second half of the run (upstream: epochs 150-300 of 300, converted to
  iterations; here the second half of ``total_steps``). Where the warm-up reaches into the cosine half (runs
  shorter than twice the warm-up) the two factors multiply (mmengine chains them differently there).

Every schedule is a function of the 0-based iteration: the learning rate of the update made at that iteration.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw", "rtmdet_adamw")
# (lr, weight decay, warm-up iterations, warm-up start factor) by default
DEFAULTS = {"sgd": (0.02, 1e-4, 500, 0.001), "adamw": (1e-4, 0.05, 0, 0.001), "rtmdet_adamw": (0.004, 0.05, 1000, 1e-5)}
COSINE_ETA_MIN = 0.05  # rtmdet_adamw: the cosine's floor, x lr


def warmup_factor(step, warmup_iters, warmup_ratio):
    """mmengine ``LinearLR(start_factor=warmup_ratio, end=warmup_iters)``: ratio -> 1 linearly, 1 after."""
    step = jnp.asarray(step, jnp.float32)
    if not warmup_iters:
        return jnp.ones_like(step)
    return jnp.where(step < warmup_iters, warmup_ratio + (1 - warmup_ratio) * step / warmup_iters, 1.0)


def lr_schedule(name, base_lr, steps_per_epoch, warmup_iters=None, warmup_ratio=None, milestones=(8, 11),
                gamma=0.1, total_steps=None):
    """The learning rate at each 0-based iteration: linear warm-up x MultiStepLR (by epoch) for sgd; warm-up then
    constant for adamw; warm-up then cosine over the second half of ``total_steps`` for rtmdet_adamw."""
    _, _, w_iters, w_ratio = DEFAULTS[name]
    warmup_iters = w_iters if warmup_iters is None else warmup_iters
    warmup_ratio = w_ratio if warmup_ratio is None else warmup_ratio
    if name == "sgd":
        bounds = [m * steps_per_epoch for m in milestones]

        def sched(step):
            warm = warmup_factor(step, warmup_iters, warmup_ratio)
            step = jnp.asarray(step, jnp.float32)
            decay = gamma ** sum((step >= b).astype(jnp.float32) for b in bounds) if bounds else 1.0
            return base_lr * warm * decay

        return sched
    if name == "adamw":
        return lambda step: base_lr * warmup_factor(step, warmup_iters, warmup_ratio)
    if total_steps is None:
        raise ValueError("rtmdet_adamw's cosine needs the run's total_steps")
    begin = total_steps // 2  # upstream: max_epochs // 2
    span = max(total_steps - begin, 1)
    eta_min = COSINE_ETA_MIN * base_lr

    def sched(step):
        warm = warmup_factor(step, warmup_iters, warmup_ratio)
        t = jnp.clip(jnp.asarray(step, jnp.float32) - begin, 0, span)
        cos = eta_min + (base_lr - eta_min) * (1 + jnp.cos(math.pi * t / span)) / 2
        return warm * cos

    return sched


def decay_mask(params):
    """rtmdet_adamw's weight-decay mask (True = decayed): mmengine's ``paramwise_cfg`` with ``norm_decay_mult=0``
    and ``bias_decay_mult=0`` -- no decay on any ``bias`` nor on the weights of norm layers (a 1-D ``weight``:
    BN, GN, LN; conv and linear weights are >= 2-D). ``params``: the ``nnx.State`` of parameters (flaxdet keeps
    torch's leaf names). A shared conv is one parameter (upstream's ``bypass_duplicate``)."""
    def decayed(path, x):
        names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        leaf = names[-2] if names[-1] == "value" and len(names) > 1 else names[-1]  # nnx: (..., leaf, .value)
        return not (leaf == "bias" or (leaf == "weight" and jnp.ndim(x) <= 1))

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(name="sgd", lr=None, weight_decay=None, steps_per_epoch=1, warmup_iters=None,
                   milestones=(8, 11), momentum=0.9, total_steps=None):
    """(optax transformation, schedule) for ``name`` in :data:`OPTIMIZERS`; ``None`` arguments take the
    optimizer's defaults (:data:`DEFAULTS`). ``total_steps``: the run's length (rtmdet_adamw's cosine)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
    d_lr, d_wd, _, _ = DEFAULTS[name]
    lr = d_lr if lr is None else lr
    wd = d_wd if weight_decay is None else weight_decay
    sched = lr_schedule(name, lr, steps_per_epoch, warmup_iters, None, milestones, total_steps=total_steps)
    if name == "sgd":
        # torch SGD: g += wd * p; buf = momentum * buf + g; p -= lr * buf
        return optax.chain(optax.add_decayed_weights(wd), optax.sgd(sched, momentum=momentum)), sched
    mask = decay_mask if name == "rtmdet_adamw" else None
    return optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd, mask=mask), sched
