"""visdet state_dict <-> flaxdet (Flax NNX) parameters, by rule: rename nothing, transpose layouts.

flaxdet modules keep visdet's attribute tree and torch's leaf names (:mod:`flaxdet.nn`), so the
visdet key of a Flax variable is its graph path joined with dots::

    ('roi_head', 'bbox_head', 'shared_fcs', 0, 'weight')  <->  roi_head.bbox_head.shared_fcs.0.weight

and the only transformation is the layout permutation its owning layer declares in
``TORCH_LAYOUT`` (Conv2d OIHW -> HWIO, Linear (out,in) -> (in,out), ConvTranspose2d IOHW -> HWIO).
There is no per-model key table and nothing is matched by position.

Key accounting is strict: every source key is used exactly once, every Flax variable is filled,
shapes are checked after the transpose. :class:`ConversionReport` lists converted / missing /
unexpected / misshapen keys; :func:`load_visdet_state_dict` raises :class:`ConversionError` (and
changes nothing in the model) unless ``strict=False``.

``key_dialect="mmdet"`` accepts upstream MMDetection-3.x spellings where visdet renamed a key
(Swin ``patch_embed.projection`` -> visdet ``patch_embed.proj``). ``key_dialect="swin"`` reads an
official (Microsoft) Swin backbone checkpoint (``layers.N.blocks...``, :mod:`flaxdet_converters.swin`):
a backbone only, so load it with ``strict=False`` to initialise a detector's backbone.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet.nn import Counter

# Upstream MMDetection spellings of keys visdet renamed: (mmdet fragment, visdet fragment).
MMDET_RENAMES = ((".patch_embed.projection.", ".patch_embed.proj."),
                 # mmcv 2.x's DepthwiseSeparableConvModule (RTMDet's CSPNeXtBlock): visdet spells them without _conv
                 (".depthwise_conv.", ".depthwise."), (".pointwise_conv.", ".pointwise."))
# spellings that only upstream checkpoints use: read whatever the key dialect (reported as renamed)
UPSTREAM_ONLY = ((".depthwise_conv.", ".depthwise."), (".pointwise_conv.", ".pointwise."))
# visdet/torch dtypes of non-float state on export (JAX keeps int32 unless x64 is enabled).
EXPORT_DTYPES = {Counter: np.int64}


class ConversionError(ValueError):
    """The checkpoint does not fit the model: see ``report``."""

    def __init__(self, message, report: "ConversionReport"):
        super().__init__(message)
        self.report = report


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model variables with no checkpoint key
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for
    misshapen: list[str] = field(default_factory=list)  # "key: checkpoint (..) -> flax (..) vs model (..)"
    renamed: list[str] = field(default_factory=list)  # "mmdet key -> visdet key" (key_dialect="mmdet")
    # keys of one shared variable (RTMDet's share_conv: a level's conv IS level 0's) whose values differ
    differing: list[str] = field(default_factory=list)
    # converted, but worth a word: "key: float16 -> float32" (the model's dtype; export restores the source's) and
    # "key: 3 of 64 values NaN/Inf" (such a model detects nothing)
    cast: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    source_dtypes: dict = field(default_factory=dict)  # {key: the checkpoint's dtype name} for the cast keys

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshapen or self.differing)

    def summary(self, limit: int = 10) -> str:
        def show(name, xs):
            more = f" ... (+{len(xs) - limit} more)" if len(xs) > limit else ""
            return f"  {name} ({len(xs)}): " + ", ".join(xs[:limit]) + more

        lines = [f"converted {len(self.converted)} keys"]
        for name in ("missing", "unexpected", "misshapen", "differing", "renamed", "cast", "nonfinite"):
            xs = getattr(self, name)
            if xs:
                lines.append(show(name, xs))
        return "\n".join(lines)

    def as_dict(self):
        return {k: list(getattr(self, k))
                for k in ("converted", "missing", "unexpected", "misshapen", "differing", "renamed", "cast",
                          "nonfinite")}


def torch_key(path) -> str:
    return ".".join(str(p) for p in path)


def flax_variables(model: nnx.Module):
    """Yield (visdet key, variable, owning layer) for every variable in ``model``, in graph order."""
    modules = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module | nnx.List):
            modules[tuple(path)] = node
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            owner = modules.get(tuple(path[:-1]))
            yield torch_key(path), node, owner


def variable_aliases(model: nnx.Module) -> dict:
    """{visdet key: [the other keys of the same variable]} for variables reachable by several paths -- a module
    shared between places, as RTMDet's ``share_conv`` (``bbox_head.cls_convs.{1,2}.{i}.conv`` IS level 0's).
    visdet's state_dict holds every such key (the same tensor); :func:`flax_variables` yields the first."""
    paths = {}

    def walk(node, path, stack):
        for key, child in nnx.graph.iter_children(node):
            p = (*path, key)
            if isinstance(child, nnx.Variable):
                paths.setdefault(id(child), []).append(torch_key(p))
            elif nnx.graph.is_graph_node(child) and id(child) not in stack:
                walk(child, p, stack | {id(child)})

    walk(model, (), frozenset())
    return {ks[0]: ks[1:] for ks in paths.values() if len(ks) > 1}


def _layout(owner, leaf: str):
    return getattr(type(owner), "TORCH_LAYOUT", {}).get(leaf)


def _normalise_keys(state_dict, key_dialect, report):
    if key_dialect == "visdet":
        if not any(a in "." + k for k in state_dict for a, _ in UPSTREAM_ONLY):
            return state_dict
        out = OrderedDict()  # an upstream RTMDet checkpoint: its depthwise-separable convs' spelling
        for k, v in state_dict.items():
            new = "." + k
            for a, b in UPSTREAM_ONLY:
                new = new.replace(a, b)
            if new[1:] != k:
                report.renamed.append(f"{k} -> {new[1:]}")
            out[new[1:]] = v
        return out
    if key_dialect == "swin":
        from flaxdet_converters.swin import official_swin_to_visdet

        converted, leftovers = official_swin_to_visdet(state_dict)
        src = [k for k in state_dict if k not in leftovers]
        report.renamed.extend(f"{a} -> {b}" for a, b in zip(src, converted) if a != b)
        out = OrderedDict(converted)
        out.update(leftovers)  # no visdet counterpart: reported as unexpected
        return out
    if key_dialect != "mmdet":
        raise ValueError(f"key_dialect must be 'visdet', 'mmdet' or 'swin', got {key_dialect!r}")
    out = OrderedDict()
    for k, v in state_dict.items():
        new = "." + k
        for a, b in MMDET_RENAMES:
            new = new.replace(a, b)
        new = new[1:]
        if new != k:
            report.renamed.append(f"{k} -> {new}")
        out[new] = v
    return out


def load_visdet_state_dict(model: nnx.Module, state_dict: dict, strict: bool = True,
                           key_dialect: str = "visdet") -> ConversionReport:
    """Fill ``model`` from a visdet state_dict (numpy arrays). All-or-nothing when strict."""
    report = ConversionReport()
    sd = _normalise_keys(state_dict, key_dialect, report)
    used, updates = set(), []
    aliases = variable_aliases(model)
    for key, var, owner in flax_variables(model):
        if key not in sd:
            report.missing.append(key)
            continue
        used.add(key)
        src = np.asarray(sd[key])
        for alias in aliases.get(key, ()):  # every name of a shared variable: present, and the same values
            if alias not in sd:
                report.missing.append(alias)
                continue
            used.add(alias)
            other = np.asarray(sd[alias])
            if other.shape != src.shape or not np.array_equal(other, src):
                report.differing.append(f"{alias} != {key} (one shared variable in the model)")
        perm = _layout(owner, key.rsplit(".", 1)[-1])
        arr = np.transpose(src, perm) if perm is not None and src.ndim == len(perm) else src
        target_shape = tuple(var.get_value().shape)
        if arr.shape != target_shape or (perm is not None and src.ndim != len(perm)):
            report.misshapen.append(f"{key}: checkpoint {tuple(src.shape)} vs model "
                                    f"{_torch_shape(target_shape, perm)}")
            continue
        target_dtype = np.dtype(var.get_value().dtype)
        if src.dtype != np.dtype(EXPORT_DTYPES.get(type(var), target_dtype)):
            report.cast.append(f"{key}: {src.dtype.name} -> {target_dtype.name}")
            report.source_dtypes[key] = src.dtype.name
        if src.dtype.kind in "fcV" and src.size:
            finite = np.isfinite(src.astype(np.float32) if src.dtype.kind == "V" else src)
            if not finite.all():
                report.nonfinite.append(f"{key}: {int(finite.size - finite.sum())} of {finite.size} values NaN/Inf")
        updates.append((var, jnp.asarray(arr, dtype=var.get_value().dtype)))
        report.converted.append(key)
    report.unexpected = [k for k in sd if k not in used]
    if strict and not report.ok:
        raise ConversionError(
            f"checkpoint does not fit {type(model).__name__} built from the config:\n{report.summary()}\n"
            "  (wrong architecture or config? pass strict=False / --no-strict to convert what fits)", report)
    for var, value in updates:
        var.set_value(value)
    return report


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _torch_shape(flax_shape, perm):
    if perm is None:
        return tuple(flax_shape)
    inv = np.argsort(perm)
    return tuple(int(flax_shape[i]) for i in inv)


def export_visdet_state_dict(model: nnx.Module, key_order=None, key_dialect="visdet",
                             dtypes=None) -> "OrderedDict[str, np.ndarray]":
    """flaxdet model -> visdet state_dict (numpy, torch layouts and dtypes). ``key_order`` (e.g. the
    source checkpoint's) fixes the order of keys; unknown names are appended in graph order. ``key_dialect``
    "mmdet" spells keys as upstream MMDetection 3.x does (RTMDet's ``depthwise_conv`` / ``pointwise_conv``).
    ``dtypes``: {visdet key: dtype name} to cast back to (the source checkpoint's, recorded at convert)."""
    out = OrderedDict()
    aliases = variable_aliases(model)
    for key, var, owner in flax_variables(model):
        arr = np.asarray(var.get_value())
        perm = _layout(owner, key.rsplit(".", 1)[-1])
        if perm is not None:
            arr = np.transpose(arr, np.argsort(perm))
        dtype = EXPORT_DTYPES.get(type(var))
        out[key] = np.array(arr, dtype=dtype if dtype is not None else arr.dtype, order="C")
        if dtypes and key in dtypes:
            out[key] = out[key].astype(_dtype(dtypes[key]))
        for alias in aliases.get(key, ()):  # a shared variable under every name visdet's state_dict has
            out[alias] = out[key].copy()  # own memory: safetensors refuses shared tensors
    if key_order:
        ordered = OrderedDict((k, out[k]) for k in key_order if k in out)
        ordered.update((k, v) for k, v in out.items() if k not in ordered)
        out = ordered
    if key_dialect == "mmdet":
        def spell(k):
            k = "." + k
            for visdet_name, mmdet_name in ((b, a) for a, b in MMDET_RENAMES):
                k = k.replace(visdet_name, mmdet_name)
            return k[1:]

        out = OrderedDict((spell(k), v) for k, v in out.items())
    elif key_dialect != "visdet":
        raise ValueError(f"export key_dialect must be 'visdet' or 'mmdet', got {key_dialect!r}")
    return out
