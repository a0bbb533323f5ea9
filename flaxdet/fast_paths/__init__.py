"""Hand-written fast paths, and the one switch that picks them per backend.

flaxdet's layers and ops have a plain formulation (what XLA is given to differentiate and optimise on any
backend) and, for some of them, a hand-written fast path tuned on XLA:CPU. Each fast path lives in a
module of this package, is compared against its plain path in the tests, and is used only where
:data:`DEFAULTS` turns it on (or an override does):

==================  ==========================================================  ======  ========
name                what (module)                                               cpu     gpu, tpu
==================  ==========================================================  ======  ========
``conv_vjp``        convolution gradients by hand (:mod:`.conv`): weight        on      off
                    gradients as one matmul (1x1) or over blocks of output
                    rows, strided input gradients by phases, stride-1 input
                    gradients as a flipped-kernel conv
``conv1x1_matmul``  unpadded 1x1 convolutions as one matmul (:mod:`.conv`)      on      off
``depthwise_taps``  depthwise convolutions (RTMDet's 5x5) as shifted             on      off
                    multiply-adds (:mod:`.conv`), at stride 1 with a VJP whose
                    weight gradient is accumulated over blocks of rows
``max_pool_taps``   max pooling as shifted maxima, columns then rows            on      off
                    (:mod:`.pool`), bit-identical, the plain pool's gradient
``nms_blocks``      greedy NMS over score-sorted blocks of candidates, each      on      off
                    checked against the boxes kept so far (:mod:`.nms_blocks`);
                    identical keeps; plain: every kept box suppresses all N
``roi_align_tiers`` RoIAlign contracted on small crop tiers, RoIs sorted and    on      off
                    chunked by crop size, big RoIs redone in a loop
                    (:mod:`.roi_align_tiers`); plain: every RoI over its whole
                    feature map (:func:`flaxdet.ops.roi_align.roi_align`)
``mask_row_buckets`` the mask branch on a static row bucket holding the         on      off
                    positives / detections, chosen on the host, a training step
                    re-run when its positives overflow (:mod:`.mask_rows`);
                    plain: every row
``mask_paste_windows`` each detection's mask pasted on a static window around    on      off
                    its box, windows bucketed by size, bit-identical
                    (:mod:`.mask_paste_windows`); plain: over the whole canvas
                    (:mod:`flaxdet.ops.mask_paste`)
``mask_head_chunks`` the inference mask head on chunks of <= 20 rows (a          on      off
                    ``lax.map``; :mod:`.mask_head_chunks`); plain: all rows
``mask_resize_lanes`` RTMDet-Ins's mask resize 16 detections at a time, laid       on      off
                    out (H, W, detections) so that its gathers move vectors
                    (:mod:`.mask_resize_lanes`); bit-identical; plain: one
                    detection at a time
``image_loop``      the inference trunk (preprocessing, backbone, neck, dense    on      off
                    heads' convolutions) one image at a time, a ``lax.map``
                    (:mod:`.image_loop`); plain: the whole batch at once
``onednn_conv``     forward convolutions (groups 1; float32, or bfloat16 with    on      off
                    float32 results) by oneDNN through an XLA FFI call
                    (:mod:`.onednn`), where its library is built (``make
                    native``); plain: XLA's convolution
==================  ==========================================================  ======  ========

On CPU each was measured faster (figures in each module and in ``docs/performance.md``); on GPU and TPU
none has been measured, so the plain paths run there. Override with the environment variable
``FLAXDET_FAST_PATHS`` (``all``, ``none``, or a comma list of names: exactly those on) read at import, or
in code with :func:`use` (a context manager) / :func:`configure`.

The choice is made when a function is traced. :func:`use` and :func:`configure` clear JAX's compilation
caches, so functions jitted earlier are traced again with the new choice.
"""
from __future__ import annotations

import contextlib
import os

NAMES = ("conv_vjp", "conv1x1_matmul", "depthwise_taps", "max_pool_taps", "nms_blocks", "roi_align_tiers",
         "mask_row_buckets", "mask_paste_windows", "mask_head_chunks", "mask_resize_lanes", "image_loop",
         "onednn_conv")
DEFAULTS = {"cpu": frozenset(NAMES), "gpu": frozenset(), "cuda": frozenset(), "rocm": frozenset(),
            "tpu": frozenset()}
ENV = "FLAXDET_FAST_PATHS"

_override: frozenset | None = None


def _parse(spec) -> frozenset:
    """``"all"`` / ``"none"`` / ``"a,b"`` / an iterable of names -> a set of names (unknown names are errors)."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        names = NAMES if s == "all" else () if s in ("none", "") else [n.strip() for n in s.split(",") if n.strip()]
    else:
        names = tuple(spec)
    bad = sorted(set(names) - set(NAMES))
    if bad:
        raise ValueError(f"unknown fast path(s) {bad}; known: {', '.join(NAMES)} (or 'all', 'none')")
    return frozenset(names)


def _from_env():
    spec = os.environ.get(ENV)
    return None if spec is None else _parse(spec)


_override = _from_env()


def active(backend: str | None = None) -> frozenset:
    """The fast paths on for ``backend`` (default: JAX's default backend) under the current settings."""
    if _override is not None:
        return _override
    if backend is None:
        import jax

        backend = jax.default_backend()
    return DEFAULTS.get(backend, frozenset())


def enabled(name: str) -> bool:
    """Whether fast path ``name`` is on (read at trace time)."""
    if name not in NAMES:
        raise ValueError(f"unknown fast path {name!r}; known: {', '.join(NAMES)}")
    return name in active()


def configure(spec) -> None:
    """Set the fast paths for this process: ``"all"``, ``"none"``, names, or None for the per-backend defaults."""
    import jax

    global _override
    _override = None if spec is None else _parse(spec)
    jax.clear_caches()


@contextlib.contextmanager
def use(spec):
    """``with fast_paths.use("none"): ...`` runs the block with exactly these fast paths on."""
    global _override
    before = _override
    configure(spec)
    try:
        yield active()
    finally:
        import jax

        _override = before
        jax.clear_caches()
