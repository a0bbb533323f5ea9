"""Optimizers as visdet defines them (optax).

``sgd`` = the 1x schedule (SGD momentum 0.9, weight decay 1e-4, LinearLR warm-up from 0.001 over 500
iterations, MultiStepLR x0.1 at epochs 8 and 11; lr 0.02 for batch 16); ``adamw`` =
``configs/optimizers/adamw_default.yaml`` (lr 1e-4, betas 0.9/0.999, weight decay 0.05, eps 1e-8, constant).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw")


def lr_schedule(name, base_lr, steps_per_epoch, warmup_iters=500, warmup_ratio=0.001, milestones=(8, 11),
                gamma=0.1):
    """visdet/mmengine LinearLR warm-up (by iteration) x MultiStepLR (by epoch) for sgd; constant for adamw."""
    if name == "adamw":
        return lambda step: jnp.asarray(base_lr, jnp.float32)
    bounds = [m * steps_per_epoch for m in milestones]

    def sched(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.where(step < warmup_iters,
                         warmup_ratio + (1 - warmup_ratio) * step / max(warmup_iters, 1), 1.0)
        decay = gamma ** sum((step >= b).astype(jnp.float32) for b in bounds) if bounds else 1.0
        return base_lr * warm * decay

    return sched


def make_optimizer(name="sgd", lr=None, weight_decay=None, steps_per_epoch=1, warmup_iters=500,
                   milestones=(8, 11), momentum=0.9):
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
    if name == "sgd":
        lr = 0.02 if lr is None else lr
        wd = 1e-4 if weight_decay is None else weight_decay
        sched = lr_schedule("sgd", lr, steps_per_epoch, warmup_iters, 0.001, milestones)
        # torch SGD: g += wd * p; buf = momentum * buf + g; p -= lr * buf
        return optax.chain(optax.add_decayed_weights(wd), optax.sgd(sched, momentum=momentum)), sched
    lr = 1e-4 if lr is None else lr
    wd = 0.05 if weight_decay is None else weight_decay
    sched = lr_schedule("adamw", lr, steps_per_epoch)
    return optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd), sched
