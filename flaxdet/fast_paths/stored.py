"""One helper shared by the fast paths: make XLA:CPU compute a value once and store it.

XLA fuses a producer into each consumer that reads it, recomputing it per read. Where a consumer reads every value
of its producer many times (a resize pass reading the previous pass at two taps per output, a gradient routed over k
taps of a k-tap selection), a chain of such steps fused together re-evaluates every earlier step for each read of
the next. ``optimization_barrier`` would stop it, but XLA:CPU drops it before fusing. A ``lax.cond`` on a predicate
XLA cannot decide at compile time is a fusion boundary: its result is a stored buffer.
"""
from __future__ import annotations

import jax


def stored(f, x, pred):
    """``f(x)``, computed once and stored before anything reads it. ``pred``: a traced boolean XLA cannot fold
    (e.g. ``v == v`` for a float ``v``; for an integer XLA folds it to true). Both branches are ``f``, so the
    result does not depend on ``pred``'s value."""
    return jax.lax.cond(pred, f, f, x)
