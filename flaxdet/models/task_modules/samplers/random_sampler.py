"""RandomSampler (visdet ``task_modules/samplers/random_sampler.py``) with static shapes.

Up to ``int(num * pos_fraction)`` positives drawn uniformly without replacement, negatives fill up to
``num``; indices sorted ascending like visdet's ``unique()``. Random keys come from a PRNG key; ``inject``
replays indices recorded from visdet / reference/ instead (the parity tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _choose(candidates, capacity, count_limit, key):
    """Uniform random subset (<= count_limit, <= capacity) of True entries, sorted ascending.
    Returns (indices (capacity,), valid (capacity,))."""
    u = jax.random.uniform(key, candidates.shape)
    prio = jnp.where(candidates, u, -1.0)
    _, idx = jax.lax.top_k(prio, capacity)
    n = jnp.minimum(candidates.sum(), count_limit)
    valid = jnp.arange(capacity) < n
    idx = jnp.where(valid, idx, jnp.iinfo(jnp.int32).max)
    idx = jnp.sort(idx)
    return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def random_sample(assigned, num, pos_fraction, neg_pos_ub, key, inject=None):
    """Returns dict(pos_inds (Ppos,), pos_valid, neg_inds (num,), neg_valid) with Ppos = int(num*pos_fraction).

    ``inject``: dict(pos_inds, pos_valid, neg_inds, neg_valid) (padded to the same capacities) recorded
    from visdet, replacing the random draw."""
    pos_cap = int(num * pos_fraction)
    if inject is not None:
        return {k: jnp.asarray(inject[k]) for k in ("pos_inds", "pos_valid", "neg_inds", "neg_valid")}
    kp, kn = jax.random.split(key)
    pos_inds, pos_valid = _choose(assigned > 0, min(pos_cap, assigned.shape[0]), pos_cap, kp)
    n_pos = pos_valid.sum()
    n_neg = num - n_pos
    if neg_pos_ub >= 0:
        n_neg = jnp.minimum(n_neg, jnp.maximum(1, n_pos) * neg_pos_ub).astype(jnp.int32)
    neg_inds, neg_valid = _choose(assigned == 0, min(num, assigned.shape[0]), n_neg, kn)
    return dict(pos_inds=pos_inds, pos_valid=pos_valid, neg_inds=neg_inds, neg_valid=neg_valid)
