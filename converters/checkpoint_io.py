"""Reading and writing visdet / MMDetection checkpoints without executing anything from them.

Formats read (dispatched on content, not extension):
* torch.save zip archives (``<prefix>/data.pkl`` + ``<prefix>/data/<key>`` storages): a raw
  ``state_dict``, or a runner checkpoint ``{'meta', 'state_dict', 'optimizer', 'message_hub', ...}``;
  keys of DDP saves lose their ``module.`` prefix;
* ``.safetensors``;
* legacy (pre-1.6, non-zip) torch pickles, through ``torch.load(weights_only=True)`` when torch is
  installed.

Threat model: a pickle can name any importable callable and have the unpickler call it. visdet's
own runner writes objects ``torch.load(weights_only=True)`` refuses (``HistoryBuffer``, numpy
scalars ...), so we cannot simply rely on it, and ``weights_only=False`` would run whatever a
malicious file carries. Our unpickler resolves a small whitelist of *inert* names (tensor
rebuilding, storages, ``OrderedDict``) to our own numpy implementations and every other global to
an :class:`Opaque` placeholder that records its name and arguments and never calls anything. No
module is imported on behalf of the file. Tensors come back as numpy arrays (dtype preserved).

The runner's config (``meta.cfg``, Python source) is parsed with :mod:`ast` only -- never
``exec``/``eval`` -- so ``flaxdet convert`` needs no separate config for such files.
"""
from __future__ import annotations

import ast
import io
import os
import pickle
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of the expected kind."""


@dataclass
class Checkpoint:
    state_dict: "OrderedDict[str, np.ndarray]"
    classes: list | None
    meta: dict
    model_cfg: dict | None
    source_format: str  # 'pth-state-dict' | 'pth-runner' | 'safetensors'
    path: str
    warnings: list = field(default_factory=list)


class Opaque:
    """Inert stand-in for any global a checkpoint names that we do not whitelist. Each name gets its
    own subclass (pickle's NEWOBJ needs a type); constructing one just stores the arguments."""

    _name = "?"

    def __init__(self, *args, **kwargs):
        self._args = args

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):
        self._state = state

    def __repr__(self):
        return f"<opaque {self._name}>"


def _opaque_class(qualname: str) -> type:
    return type("Opaque_" + qualname.replace(".", "_"), (Opaque,), {"_name": qualname})


class _Storage:
    def __init__(self, dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, np.ndarray):
        raise CheckpointError("tensor without a readable storage")
    item = storage.itemsize
    if len(size) == 0:
        return storage[offset:offset + 1].reshape(()).copy()
    arr = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                          strides=tuple(s * item for s in stride), writeable=False)
    return np.array(arr, copy=True)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *args):
    return data


_WHITELIST = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, zf, prefix, byteorder):
        super().__init__(fh)
        self.zf, self.prefix, self.byteorder, self.cache = zf, prefix, byteorder, {}

    def find_class(self, module, name):
        if (module, name) in _WHITELIST:
            return _WHITELIST[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        return _opaque_class(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid[:5]
        if key in self.cache:
            return self.cache[key]
        dtype = storage_type.dtype if isinstance(storage_type, _Storage) else None
        if dtype is None:
            raise CheckpointError(f"storage of unsupported type {storage_type!r}")
        raw = self.zf.read(f"{self.prefix}/data/{key}")
        if dtype == "bfloat16":
            u16 = np.frombuffer(raw, dtype=self.byteorder + "u2")
            arr = (u16.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(self.byteorder))
            arr = arr.astype(np.dtype(dtype).newbyteorder("="), copy=False)
        self.cache[key] = arr
        return arr


def _load_torch_zip(path: Path):
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt torch file ({e})") from None
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise CheckpointError(f"{path}: a zip archive but not a torch checkpoint (no data.pkl)")
    prefix = pkl[0].rsplit("/", 1)[0] if "/" in pkl[0] else ""
    order = "<"
    if f"{prefix}/byteorder" in names and zf.read(f"{prefix}/byteorder").strip() == b"big":
        order = ">"
    try:
        with zf:
            return _Unpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix, order).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt torch file ({type(e).__name__}: {e})") from None


def _load_legacy(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: legacy (non-zip) torch format; reading it needs torch installed") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain data
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None

    def conv(x):
        if hasattr(x, "detach"):
            return x.detach().cpu().numpy()
        if isinstance(x, dict):
            return type(x)((k, conv(v)) for k, v in x.items()) if isinstance(x, OrderedDict) else {k: conv(v) for k, v in x.items()}
        return x

    return conv(obj)


def _plain(x):
    """meta as plain data; placeholders become their repr."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, Opaque):
        return repr(x)
    return x


def _tensor_dict(d):
    return isinstance(d, dict) and d and all(isinstance(v, np.ndarray) for v in d.values())


def load_checkpoint(path) -> Checkpoint:
    """Read a visdet / MMDetection checkpoint (see module doc). Raises CheckpointError."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    with open(p, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"{p}: empty file, expected a .pth or .safetensors checkpoint")
    warnings = []
    if head[:2] == b"PK":
        obj, fmt = _load_torch_zip(p), "pth"
    elif len(head) == 8 and int.from_bytes(head, "little") < 100_000_000 and _looks_safetensors(p):
        return _load_safetensors(p)
    elif head[:1] == b"\x80":
        obj, fmt = _load_legacy(p), "pth"
    else:
        raise CheckpointError(f"{p}: not a checkpoint (neither a torch zip archive, a pickle nor safetensors)")
    if isinstance(obj, dict) and "state_dict" in obj:
        sd, source = obj["state_dict"], "pth-runner"
    else:
        sd, source = obj, "pth-state-dict"
    if not _tensor_dict(sd):
        what = (f"dict with keys {list(obj)[:8]} but no 'state_dict' and no tensors" if isinstance(obj, dict)
                else f"top-level object is {type(obj).__name__}")
        raise CheckpointError(f"{p}: not a checkpoint ({what}); expected a state_dict or a runner "
                              "checkpoint with 'state_dict'")
    sd = _strip_module(OrderedDict(sd))
    meta = _plain(obj.get("meta", {})) if source == "pth-runner" and isinstance(obj.get("meta"), dict) else {}
    classes = None
    dm = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    if dm.get("classes") is not None:
        classes = list(dm["classes"])
    elif meta.get("CLASSES") is not None:
        classes = list(meta["CLASSES"])
    model_cfg = None
    cfg_text = meta.get("cfg")
    if isinstance(cfg_text, str) and "model" in cfg_text:
        try:
            model_cfg = parse_python_config(cfg_text, strict=False).get("model")
        except CheckpointError as e:
            warnings.append(f"meta.cfg could not be parsed: {e}")
    return Checkpoint(sd, classes, meta, model_cfg, source, str(p), warnings)


def _looks_safetensors(p: Path) -> bool:
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(1) == b"{" and n > 1


def _load_safetensors(p: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        sd = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: truncated or corrupt safetensors file ({e})") from None
    from safetensors import safe_open

    with safe_open(str(p), "np") as f:
        meta = dict(f.metadata() or {})
        order = list(f.keys())
    import json

    classes = json.loads(meta["classes"]) if "classes" in meta else None
    if "key_order" in meta:
        stored = json.loads(meta["key_order"])
        if sorted(stored) == sorted(order):
            order = stored
    sd = _strip_module(OrderedDict((k, sd[k]) for k in order))
    return Checkpoint(sd, classes, meta, None, "safetensors", str(p))


def _strip_module(sd):
    if sd and all(k.startswith("module.") for k in sd):
        return OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


# ------------------------------------------------------------------------------------------- writing
def save_checkpoint(path, state_dict, classes=None, meta=None, format=None):
    """Write ``.pth`` (torch.save; runner-style dict when classes/meta are given) or ``.safetensors``,
    atomically: on failure nothing is left at ``path`` and an existing file is untouched."""
    p = Path(path)
    fmt = format or {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors"}.get(p.suffix)
    if fmt not in ("pth", "safetensors"):
        raise CheckpointError(f"{p}: unknown checkpoint format (use .pth or .safetensors)")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    os.close(fd)
    try:
        arrays = OrderedDict((k, np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v)) for k, v in state_dict.items())
        for k, v in arrays.items():
            if v.dtype == object:
                raise CheckpointError(f"cannot save {k}: not a numeric array")
        if fmt == "safetensors":
            import json

            from safetensors.numpy import save_file

            md = {"key_order": json.dumps(list(arrays))}  # safetensors stores keys sorted; keep visdet's order
            if classes is not None:
                md["classes"] = json.dumps(list(classes))
            save_file(dict(arrays), tmp, metadata=md)
        else:
            import torch

            sd = OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in arrays.items())
            if classes is not None or meta:
                obj = {"meta": dict(meta or {}, dataset_meta={"classes": list(classes) if classes else None}),
                       "state_dict": sd}
            else:
                obj = sd
            torch.save(obj, tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


# ---------------------------------------------------------------------------- meta.cfg (no exec)
def parse_python_config(text: str, strict: bool = True) -> dict:
    """mmengine-style Python config source -> dict, via ``ast`` only. Supported values: literals,
    lists/tuples/sets/dicts, unary +/-, and ``dict(key=value, ...)`` calls. With ``strict`` any other
    statement or value raises; otherwise top-level assignments with unsupported values are skipped."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise CheckpointError(f"config is not valid Python (line {e.lineno}): {e.msg}") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = _value(node.value)
            except CheckpointError:
                if strict:
                    raise
        elif strict:
            raise CheckpointError(f"line {node.lineno}: unsupported statement {type(node).__name__} in config")
    return out


def _value(n):
    if isinstance(n, ast.Constant):
        return n.value
    if isinstance(n, ast.List):
        return [_value(e) for e in n.elts]
    if isinstance(n, ast.Tuple):
        return tuple(_value(e) for e in n.elts)
    if isinstance(n, ast.Set):
        return {_value(e) for e in n.elts}
    if isinstance(n, ast.Dict):
        if any(k is None for k in n.keys):
            raise CheckpointError(f"line {n.lineno}: '**' unpacking is not supported in config")
        return {_value(k): _value(v) for k, v in zip(n.keys, n.values)}
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub | ast.UAdd):
        v = _value(n.operand)
        if not isinstance(v, int | float):
            raise CheckpointError(f"line {n.lineno}: unary operator on a non-number")
        return -v if isinstance(n.op, ast.USub) else v
    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "dict" and not n.args:
        if any(k.arg is None for k in n.keywords):
            raise CheckpointError(f"line {n.lineno}: '**' unpacking is not supported in config")
        return {k.arg: _value(k.value) for k in n.keywords}
    raise CheckpointError(f"line {getattr(n, 'lineno', '?')}: unsupported expression {type(n).__name__} in config")
