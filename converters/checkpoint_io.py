"""Reading and writing visdet / MMDetection checkpoints without executing anything from them.

Formats read (dispatched on the file's content, not its extension):

* ``torch.save`` zip archives (the default since torch 1.6): ``<prefix>/data.pkl`` is a pickle whose
  tensors refer, via persistent ids, to raw storages ``<prefix>/data/<key>`` (``<prefix>/byteorder``
  says little/big endian). The top-level object is a raw ``state_dict`` or a runner checkpoint
  ``{'meta', 'state_dict', 'optimizer', 'message_hub', ...}``. Read by our own unpickler, no torch needed.
* ``.safetensors`` (``safetensors.numpy``).
* legacy (pre-1.6, non-zip) torch pickles, only through ``torch.load(weights_only=True)`` when torch is
  installed.

Keys of DDP saves lose their ``module.`` prefix. Tensors come back as numpy arrays, dtype and shape kept
(``num_batches_tracked`` stays a 0-d int64; bfloat16 is widened to float32, with a warning).

Threat model: a pickle names callables by module and name and makes the unpickler call them (``os.system``
with any argument is one pickle opcode away), and the file is whatever the user downloaded.
visdet's runner writes objects ``torch.load(weights_only=True)`` refuses (``HistoryBuffer``, numpy
scalars), and ``weights_only=False`` would run whatever a malicious file carries. So our unpickler imports
nothing: a short whitelist of names (tensor rebuilding, storage types, ``OrderedDict``, a few builtins) maps
to our own numpy code, and every other global becomes an inert :class:`Opaque` placeholder that records its
name and arguments and never calls anything. Tensor views are bounds-checked against their storage before
``as_strided`` (a crafted stride must not read process memory), storages are read lazily (optimizer state is
never read), and every failure becomes a :class:`CheckpointError`. Memory is capped before it is allocated: a
storage's declared element count must fit its zip member, the storages read plus the tensors materialised stay
within a budget (4x the file's size, at least 256 MiB; ``FLAXDET_MAX_CHECKPOINT_MB``), and a stride-0 (expanded)
view larger than its storage is refused beyond 1 MiB -- a few-MB file cannot inflate to gigabytes.

The runner's config (``meta.cfg``, Python source) is parsed with :mod:`ast` only -- never ``exec``/``eval``
-- so converting such a file needs no separate config.
"""
from __future__ import annotations

import ast
import io
import json
import math
import os
import pickle
import re
import tempfile
import types
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint, or a state_dict that cannot be written."""


@dataclass
class Checkpoint:
    state_dict: dict[str, np.ndarray]  # in file order
    classes: list[str] | None  # meta.dataset_meta.classes (or legacy meta.CLASSES)
    meta: dict  # plain-data copy of meta; unknown objects appear as '<opaque module.Name>' strings
    model_cfg: dict | None  # the `model` dict parsed from meta.cfg (runner checkpoints)
    source_format: str  # 'pth-state-dict' | 'pth-runner' | 'safetensors'
    path: str
    warnings: list = field(default_factory=list)
    source_dtypes: dict = field(default_factory=dict)  # {key: dtype name} of tensors widened on reading (bfloat16)


# ------------------------------------------------------------------------------ restricted unpickling
class Opaque:
    """Inert stand-in for a global the file names that we do not whitelist (one subclass per name, since
    pickle's NEWOBJ needs a type). Calling, constructing, BUILD, SETITEM(S) and APPEND(S) only record."""

    _name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items, self.list = args, kwargs, None, {}, []
        return self

    def __call__(self, *args, **kwargs):
        return _opaque(f"{self._name}(...)")(*args, **kwargs)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # SETITEM(S) on dict subclasses (e.g. mmengine's ConfigDict)
        self.items[key] = value

    def append(self, value):  # APPEND(S) on list subclasses
        self.list.append(value)

    def __repr__(self):
        return f"<opaque {self._name}>"


def _opaque(qualname: str) -> type:
    return type("Opaque", (Opaque,), {"_name": qualname})


class _Sealed:
    """Our own objects reachable from the pickle: BUILD (``__setstate__``) on them is refused, so a file
    cannot rewire a storage, a tensor or a whitelisted function."""

    __slots__ = ()

    def __setstate__(self, state):
        raise CheckpointError(f"pickle tries to modify {type(self).__name__.strip('_')}")


class _Call(_Sealed):
    """A whitelisted function, wrapped afresh for every lookup."""

    __slots__ = ("f",)

    def __init__(self, f):
        self.f = f

    def __call__(self, *args, **kwargs):
        return self.f(*args, **kwargs)


class _StorageType(_Sealed):
    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


_STORAGES = {"FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
             "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
             "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "c8", "ComplexDoubleStorage": "c16",
             "UntypedStorage": "u1"}


# Memory a checkpoint may make us allocate (its storages read plus the tensors materialised from them), checked
# before each allocation: a few-MB file must not inflate to gigabytes (a compressed member, a lying size, a
# stride-0 expansion). Default: 4x the file's size, at least 256 MiB; FLAXDET_MAX_CHECKPOINT_MB or
# load_checkpoint(max_bytes=) overrides.
MIN_BUDGET_BYTES = 256 << 20
# a view with more elements than its storage (stride 0 / overlapping strides) is materialised only up to this size
MAX_EXPANDED_BYTES = 1 << 20


class _Budget(_Sealed):
    __slots__ = ("limit", "used", "how")

    def __init__(self, limit, how):
        self.limit, self.used, self.how = int(limit), 0, how

    def charge(self, nbytes, what):
        if self.used + nbytes > self.limit:
            raise CheckpointError(
                f"{what} needs {_mib(nbytes)} MiB, over this checkpoint's memory budget ({_mib(self.limit)} MiB "
                f"in all, {_mib(self.used)} MiB used; {self.how}); if the file is genuine, raise it with "
                "FLAXDET_MAX_CHECKPOINT_MB")
        self.used += nbytes


def _mib(n):
    return f"{n / 2**20:.1f}" if n < 2**20 else f"{n // 2**20}"


def _dims(xs) -> str:  # a tensor's size/stride for a message (already checked to be ints)
    return "(" + ", ".join(str(x)[:20] for x in xs[:8]) + (", ..." if len(xs) > 8 else "") + ")"


def _itemsize(dtype):
    return 2 if dtype == "bf16" else np.dtype(dtype).itemsize


class _Storage(_Sealed):
    """A storage in the zip, read (once) when a tensor that uses it is materialised: ``numel`` elements as its
    persistent id declares, checked against the member's size and the budget before anything is read."""

    __slots__ = ("zf", "member", "dtype", "order", "numel", "budget", "_data")

    def __init__(self, zf, member, dtype, order, numel, budget):
        self.zf, self.member, self.dtype, self.order, self._data = zf, member, dtype, order, None
        self.numel, self.budget = numel, budget

    def info(self) -> zipfile.ZipInfo:
        """The storage's zip member, checked to hold the declared elements (nothing is read)."""
        try:
            info = self.zf.getinfo(self.member)
        except KeyError:
            raise CheckpointError(f"storage member {self.member} is missing from the archive") from None
        nbytes = self.numel * _itemsize(self.dtype)
        if info.file_size < nbytes:
            raise CheckpointError(f"storage {self.member} declares {self.numel} elements ({nbytes} bytes) but "
                                  f"its member holds {info.file_size} bytes")
        return info

    def data(self) -> np.ndarray:
        if self._data is None:
            info, nbytes = self.info(), self.numel * _itemsize(self.dtype)
            widened = self.numel * 4 if self.dtype == "bf16" else 0  # bf16 comes back as float32
            self.budget.charge(nbytes + widened, f"storage {self.member} ({self.numel} elements)")
            with self.zf.open(info) as f:
                raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise CheckpointError(f"storage {self.member} is truncated ({len(raw)} of {nbytes} bytes)")
            if self.dtype == "bf16":  # the upper half of a float32
                self._data = (np.frombuffer(raw, self.order + "u2").astype(np.uint32) << 16).view(np.float32)
            else:
                dt = np.dtype(self.dtype)
                self._data = np.frombuffer(raw, dt.newbyteorder(self.order)).astype(dt, copy=False)
        return self._data


class _Tensor(_Sealed):
    """A tensor as (storage, offset, size, stride), turned into an owned numpy array by ``numpy()``."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"tensor whose storage is {_kind(storage)}")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def numpy(self) -> np.ndarray:
        off, size, stride, st = self.offset, self.size, self.stride, self.storage
        ints = [off, *size, *stride]
        if len(size) != len(stride) or not all(type(i) is int and i >= 0 for i in ints):
            raise CheckpointError(f"tensor with invalid offset/size/stride: {[_short(i) for i in ints][:9]}")
        st.info()
        n = math.prod(size)
        if n == 0:
            return np.zeros(size, "f4" if st.dtype == "bf16" else st.dtype)
        if off + sum((k - 1) * s for k, s in zip(size, stride)) >= st.numel:  # before reading anything
            raise CheckpointError(f"tensor (offset {off}, size {_dims(size)}, stride {_dims(stride)}) reaches "
                                  f"outside its storage of {st.numel} elements")
        nbytes = n * (4 if st.dtype == "bf16" else _itemsize(st.dtype))
        if n > st.numel and nbytes > MAX_EXPANDED_BYTES:
            raise CheckpointError(f"tensor of size {_dims(size)} ({n} elements) is an expanded (stride-0 or "
                                  f"overlapping) view of a storage of {st.numel} elements; refusing to materialise "
                                  f"more than {MAX_EXPANDED_BYTES >> 20} MiB of repeated values")
        self.storage.budget.charge(nbytes, f"tensor of size {_dims(size)}")
        data = st.data()
        view = np.lib.stride_tricks.as_strided(data[off:], size, [s * data.itemsize for s in stride],
                                               writeable=False)
        return view.copy()


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):  # tensor subclasses: keep the plain tensor
    if isinstance(func, _Call) and func.f is _rebuild_tensor_v2:
        return func(*args)
    return _opaque("torch._utils._rebuild_from_type_v2")(func, new_type, args, state)


def _codecs_encode(text, encoding="utf-8"):  # how protocol 2 pickles `bytes`
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    return _opaque("_codecs.encode")(text, encoding)


_WHITELIST = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
    **{(m, f.__name__): f for m in ("builtins", "__builtin__") for f in (set, frozenset, slice, complex)},
}


class _Unpickler(pickle._Unpickler):
    def __init__(self, data: bytes, zf, prefix, order, budget):
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix, self.order, self.storages, self.budget = zf, prefix, order, {}, budget

    def find_class(self, module, name):
        if (module, name) in _WHITELIST:
            f = _WHITELIST[(module, name)]
            return _Call(f) if isinstance(f, types.FunctionType) else f
        if module in ("torch", "torch.storage") and name in _STORAGES:
            return _StorageType(name, _STORAGES[name])
        return _opaque(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id ({_kind(pid)})")
        stype, key = pid[1], pid[2]
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            what = stype._name if isinstance(stype, type) and issubclass(stype, Opaque) else _kind(stype)
            raise CheckpointError(f"storage of unsupported type {what}")
        numel = pid[4] if len(pid) >= 5 else None
        if type(numel) is not int or numel < 0:
            raise CheckpointError(f"storage {_short(key)} with an invalid element count ({_short(numel)})")
        if key not in self.storages:
            self.storages[key] = _Storage(self.zf, f"{self.prefix}/data/{key}", stype.dtype, self.order, numel,
                                          self.budget)
        return self.storages[key]


def _materialize(x, memo):
    """Lazy tensors -> arrays, tuples -> lists, placeholders -> their SETITEM/APPEND contents or
    '<opaque module.Name>'. Shared and cyclic references are converted once (a pickle can nest them)."""
    if isinstance(x, _Tensor):
        return x.numpy()
    if isinstance(x, Opaque):
        contents = x.items or x.list
        return _materialize(contents, memo) if contents and isinstance(contents, dict | list) else repr(x)
    if not isinstance(x, dict | list | tuple):
        return x
    if id(x) not in memo:
        out = memo[id(x)] = type(x)() if isinstance(x, dict) else []
        if isinstance(x, dict):
            out.update((k, _materialize(v, memo)) for k, v in x.items())
        else:
            out.extend(_materialize(v, memo) for v in x)
    return memo[id(x)]


def _kind(x) -> str:  # untrusted objects are described, never repr()'d (a pickle can make that exponential)
    return f"placeholder {x._name}" if isinstance(x, Opaque) else type(x).__name__


def _short(x) -> str:
    return repr(x)[:40] if isinstance(x, str | int | float | bool | type(None)) else _kind(x)


def _budget(p: Path, max_bytes=None) -> _Budget:
    if max_bytes is not None:
        return _Budget(max_bytes, "max_bytes")
    env = os.environ.get("FLAXDET_MAX_CHECKPOINT_MB")
    if env:
        try:
            return _Budget(float(env) * 2**20, "FLAXDET_MAX_CHECKPOINT_MB")
        except ValueError:
            raise CheckpointError(f"FLAXDET_MAX_CHECKPOINT_MB={env[:40]!r} is not a number of MiB") from None
    return _Budget(max(MIN_BUDGET_BYTES, 4 * p.stat().st_size), "4x the file size, at least 256 MiB")


def _load_torch_zip(p: Path, max_bytes=None):
    budget = _budget(p, max_bytes)
    zf = zipfile.ZipFile(p)
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise CheckpointError("not a checkpoint: a zip archive without <name>/data.pkl "
                                  "(not written by torch.save); expected .pth or .safetensors")
        prefix = pkls[0].split("/")[0]
        order = ">" if f"{prefix}/byteorder" in zf.namelist() and zf.read(f"{prefix}/byteorder") == b"big" else "<"
        pkl = zf.getinfo(pkls[0])
        budget.charge(pkl.file_size, f"{pkls[0]} ({pkl.file_size} bytes unpacked)")
        obj = _Unpickler(zf.read(pkl), zf, prefix, order, budget).load()
        sd, source = _find_state_dict(obj, lambda v: isinstance(v, _Tensor))
        bf16 = [k for k, v in sd.items() if v.storage.dtype == "bf16"]
        sd = OrderedDict((k, v.numpy()) for k, v in sd.items())
        meta = _materialize(obj.get("meta"), {}) if source == "pth-runner" else {}
    warnings = [f"bfloat16 tensors widened to float32: {bf16[:5]}{'...' if len(bf16) > 5 else ''}"] if bf16 else []
    return sd, source, meta, warnings, bf16


def _load_legacy(p: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError("legacy (non-zip) torch pickle; reading it needs torch installed "
                              "(or re-save it with torch >= 1.6)") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain data
        raise CheckpointError(f"not a readable checkpoint: legacy torch pickle that torch.load(weights_only=True) "
                              f"refuses ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None

    bf16 = []

    def conv(x, key=None):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16:
                bf16.append(key)
            return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        if isinstance(x, dict):
            return type(x)((k, conv(v, k)) for k, v in x.items())
        return [conv(v) for v in x] if isinstance(x, list | tuple) else x

    obj = conv(obj)
    sd, source = _find_state_dict(obj, lambda v: isinstance(v, np.ndarray))
    return sd, source, (obj.get("meta") if source == "pth-runner" else {}), [], bf16


def _find_state_dict(obj, is_tensor):
    def tensors(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) and is_tensor(v) for k, v in d.items())

    if isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
        if tensors(sd):
            return sd, "pth-runner"
        bad = ([f"{_short(k)}: {_kind(v)}" for k, v in sd.items() if not (isinstance(k, str) and is_tensor(v))][:3]
               if isinstance(sd, dict) else [])
        what = f"a dict with non-tensor entries {bad}" if bad else "empty" if sd == {} else _kind(sd)
        raise CheckpointError(f"not a checkpoint: runner-style dict whose 'state_dict' is {what}")
    if tensors(obj):
        return obj, "pth-state-dict"
    what = (f"dict with keys [{', '.join(_short(k) for k in list(obj)[:8])}] but no 'state_dict' and no tensors"
            if isinstance(obj, dict)
            else f"top-level object is {_kind(obj)}")
    raise CheckpointError(f"not a checkpoint ({what}); expected a state_dict (names -> tensors) or a runner "
                          "checkpoint with a 'state_dict' entry")


def _load_safetensors(p: Path):
    from safetensors import safe_open

    with safe_open(str(p), "np") as f:
        md = dict(f.metadata() or {})
        sd = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    meta, warnings = dict(md), []
    for k in ("classes", "key_order"):  # written by save_checkpoint as JSON
        try:
            meta[k] = json.loads(md[k]) if k in md else None
        except ValueError:
            warnings.append(f"safetensors metadata {k!r} is not JSON; ignored")
            meta[k] = None
    order, classes = meta.pop("key_order"), meta.pop("classes")
    if isinstance(order, list) and sorted(order) == sorted(sd):  # safetensors itself sorts the names
        sd = OrderedDict((k, sd[k]) for k in order)
    if classes is not None:
        meta["dataset_meta"] = {"classes": classes}
    return sd, "safetensors", meta, warnings, []


def _is_safetensors(p: Path, head: bytes) -> bool:
    n = int.from_bytes(head[:8], "little")
    if len(head) < 8 or not 2 <= n < 100_000_000:
        return False
    with open(p, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def load_checkpoint(path, max_bytes=None) -> Checkpoint:
    """Read a visdet / MMDetection checkpoint (see the module doc). Raises CheckpointError. ``max_bytes``: the
    memory a ``.pth`` may make us allocate (default 4x its file size, at least 256 MiB, or
    ``FLAXDET_MAX_CHECKPOINT_MB``), checked before every allocation."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    try:
        with open(p, "rb") as f:
            head = f.read(8)
        if not head:
            raise CheckpointError("empty file; expected a .pth or .safetensors checkpoint")
        if head[:2] == b"PK":
            sd, source, meta, warnings, bf16 = _load_torch_zip(p, max_bytes)
        elif _is_safetensors(p, head):
            sd, source, meta, warnings, bf16 = _load_safetensors(p)
        elif head[:1] == b"\x80":
            sd, source, meta, warnings, bf16 = _load_legacy(p)
        else:
            raise CheckpointError(f"not a checkpoint: starts with {head!r}, neither a torch zip archive, "
                                  "a pickle nor safetensors")
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None
    except Exception as e:  # anything the file provoked: truncation, bad zip, broken pickle, ...
        raise CheckpointError(f"{p}: truncated or corrupt checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not sd:
        raise CheckpointError(f"{p}: not a checkpoint: it holds no tensors")
    if all(k.startswith("module.") for k in sd):  # DistributedDataParallel
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    meta = meta if isinstance(meta, dict) else {}
    dm = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    classes = dm.get("classes", meta.get("CLASSES"))
    if classes is not None and not (isinstance(classes, list | tuple) and all(isinstance(c, str) for c in classes)):
        warnings.append(f"meta classes ignored: not a list of names ({_kind(classes)})")
        classes = None
    model_cfg, cfg = None, meta.get("cfg")
    if isinstance(cfg, str) and re.search(r"^model\s*=\s*dict\(", cfg, re.M):
        try:
            model_cfg = parse_python_config(cfg, strict=False).get("model")
        except CheckpointError as e:
            warnings.append(f"meta.cfg could not be parsed: {e}")
        if model_cfg is not None and not isinstance(model_cfg, dict):
            model_cfg = None
    widened = {k[len("module."):] if k not in sd and k.startswith("module.") else k: "bfloat16" for k in bf16}
    return Checkpoint(sd, list(classes) if classes is not None else None, meta, model_cfg, source, str(p), warnings,
                      {k: v for k, v in widened.items() if k in sd})


# --------------------------------------------------------------------------------------------- writing
def save_checkpoint(path, state_dict, classes=None, meta=None, format=None) -> Path:
    """Write ``.safetensors`` or ``.pth`` (torch.save; a runner-style dict with ``meta.dataset_meta.classes``
    when ``classes`` or ``meta`` are given, else a raw state_dict). Atomic: on failure nothing is left at
    ``path`` and an existing file there is untouched. Raises CheckpointError."""
    p = Path(path)
    fmt = str(format or p.suffix).lower().lstrip(".")
    fmt = {"pt": "pth", "ckpt": "pth"}.get(fmt, fmt)
    if fmt not in ("pth", "safetensors"):
        raise CheckpointError(f"{p}: unknown checkpoint format {format or p.suffix!r}; expected .pth or .safetensors")
    if fmt == "pth":
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{p}: writing .pth needs torch installed; write .safetensors instead") from None
    arrays = OrderedDict()
    for k, v in state_dict.items():
        try:
            a = np.asarray(v)
        except Exception as e:
            raise CheckpointError(f"{p}: cannot save {k!r}: not convertible to a numpy array ({e})") from None
        if not isinstance(k, str) or (a.dtype.kind not in "biufc" and a.dtype.name != "bfloat16"):
            raise CheckpointError(f"{p}: cannot save {k!r}: expected str names and numeric arrays, got {a.dtype}")
        if fmt == "safetensors" and k == "__metadata__":
            raise CheckpointError(f"{p}: cannot save {k!r}: a reserved name in safetensors")
        arrays[k] = np.asarray(a, a.dtype.newbyteorder("="), order="C")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        if fmt == "safetensors":
            from safetensors.numpy import save_file

            md = {"key_order": json.dumps(list(arrays))}
            if classes is not None:
                md["classes"] = json.dumps(list(classes))
            save_file(dict(arrays), tmp, metadata=md)
        else:
            obj = sd = OrderedDict((k, _to_torch(torch, v)) for k, v in arrays.items())
            if classes is not None or meta:
                m = dict(meta or {})
                if classes is not None:
                    m["dataset_meta"] = {**(m.get("dataset_meta") or {}), "classes": list(classes)}
                obj = {"meta": m, "state_dict": sd}
            torch.save(obj, tmp)
        os.chmod(tmp, os.stat(p).st_mode & 0o777 if p.exists() else 0o644)
        os.replace(tmp, p)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, CheckpointError) or not isinstance(e, Exception):  # e.g. KeyboardInterrupt
            raise
        raise CheckpointError(f"{p}: could not write checkpoint ({type(e).__name__}: {e})") from e
    return p


def _to_torch(torch, a):
    if a.dtype.name == "bfloat16":  # numpy (ml_dtypes) bfloat16: torch.from_numpy does not take it
        return torch.from_numpy(np.array(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


# ------------------------------------------------------------------------------- meta.cfg (no exec)
def parse_python_config(text: str, strict: bool = True) -> dict:
    """mmengine-style Python config source -> dict of its top-level assignments, via ``ast`` only.
    Values may be literals, lists/tuples/sets/dicts, unary +/- and ``dict(key=value, ...)`` calls. With
    ``strict`` anything else (imports, other calls, names, attributes, lambdas, f-strings ...) raises a
    CheckpointError naming the line; otherwise such statements and assignments are skipped."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CheckpointError(f"config is not valid Python (line {getattr(e, 'lineno', '?')}): {e}") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = _value(node.value)
            except RecursionError:
                if strict:
                    raise CheckpointError(f"line {node.lineno}: value nested too deeply") from None
            except CheckpointError:
                if strict:
                    raise
        elif strict:
            raise CheckpointError(f"line {node.lineno}: unsupported statement ({type(node).__name__}) in config; "
                                  "expected only `name = <literal or dict(...)>` assignments")
    return out


def _value(n):
    if isinstance(n, ast.Constant):
        return n.value
    if isinstance(n, ast.List | ast.Tuple):
        vals = [_value(e) for e in n.elts]
        return vals if isinstance(n, ast.List) else tuple(vals)
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub | ast.UAdd):
        v = _value(n.operand)
        if isinstance(v, int | float | complex) and not isinstance(v, bool):
            return -v if isinstance(n.op, ast.USub) else v
    call = isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "dict" and not n.args
    if (isinstance(n, ast.Dict) and None not in n.keys) or (call and all(k.arg for k in n.keywords)):
        items = zip(n.keys, n.values) if isinstance(n, ast.Dict) else ((k.arg, k.value) for k in n.keywords)
        try:
            return {(k if isinstance(k, str) else _value(k)): _value(v) for k, v in items}
        except TypeError:
            raise CheckpointError(f"line {n.lineno}: unhashable dict key in config") from None
    if isinstance(n, ast.Set):
        try:
            return {_value(e) for e in n.elts}
        except TypeError:
            raise CheckpointError(f"line {n.lineno}: unhashable set element in config") from None
    src = type(n).__name__
    raise CheckpointError(f"line {getattr(n, 'lineno', '?')}: unsupported expression ({src}) in config; expected "
                          "literals, lists, tuples, dicts and dict(key=value) calls")
