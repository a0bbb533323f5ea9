"""Hostile .pth files: a storage member that inflates to 2 GB, a lying element count, a stride-0 expansion. Each is
refused before the allocation, in one CheckpointError line, quickly and in bounded memory (issue 19)."""
from __future__ import annotations

import resource
import time
import zipfile

import numpy as np
import pytest

from flaxdet_converters.checkpoint_io import CheckpointError, load_checkpoint
from tests.converters.test_checkpoint_io import _g, _i, _s, _torch_zip


def _tensor(offset, size, stride, numel, storage="FloatStorage", key="0"):
    pid = b"(" + _s("storage") + _g("torch", storage) + _s(key) + _s("cpu") + _i(numel) + b"tQ"
    ints = lambda xs: b"(" + b"".join(_i(x) for x in xs) + b"t"  # noqa: E731
    return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _i(offset) + ints(size) + ints(stride)
            + b"\x89" + _g("collections", "OrderedDict") + b")R" + b"tR")


def _sd(*tensors):  # {'w0': t0, 'w1': t1, ...}
    return b"}" + b"".join(_s(f"w{i}") + t + b"s" for i, t in enumerate(tensors))


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _refused(path, match, **kw):
    before, t = _rss_mb(), time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kw)
    msg = str(e.value)
    assert time.perf_counter() - t < 3, "took too long"
    assert _rss_mb() - before < 150, f"grew by {_rss_mb() - before:.0f} MB"
    assert match in msg and path.name in msg and "\n" not in msg and len(msg) < 500, msg
    return msg


def test_storage_member_that_inflates_to_2gb(tmp_path):
    """A ~9 MB file whose storage member deflates from 2 GiB of zeros, honestly declared: over the budget."""
    n = 2**29  # float32 elements: 2 GiB
    p = tmp_path / "inflate.pth"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + _sd(_tensor(0, (n,), (1,), n)) + b".")
        z.writestr("archive/byteorder", "little")
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            chunk = bytes(1 << 24)
            for _ in range(n * 4 // len(chunk)):
                f.write(chunk)
    assert p.stat().st_size < 16 << 20
    _refused(p, "over this checkpoint's memory budget")


def test_lying_element_count(tmp_path):
    """The pickle declares a 2 GiB storage; the member holds 16 bytes."""
    n = 2**29
    p = _torch_zip(tmp_path / "lying.pth", _sd(_tensor(0, (n,), (1,), n)))
    _refused(p, "declares 536870912 elements")


def test_stride0_expansion(tmp_path):
    """A 4-element storage viewed as 50000 x 50000 with stride 0 (9.3 GiB once materialised)."""
    p = _torch_zip(tmp_path / "expand.pth", _sd(_tensor(0, (50000, 50000), (0, 0), 4)))
    _refused(p, "expanded (stride-0 or overlapping) view")


def test_many_views_of_one_storage_are_charged(tmp_path):
    """1000 full views of a 4 MiB storage: 4 GiB of tensors from a 4 MiB file (stopped at the budget, here 32 MiB)."""
    n = 1 << 20
    p = _torch_zip(tmp_path / "views.pth", _sd(*[_tensor(0, (n,), (1,), n) for _ in range(1000)]),
                   storage=np.zeros(n, "<f4").tobytes())
    _refused(p, "memory budget", max_bytes=32 << 20)


def test_budget_setting(tmp_path, monkeypatch):
    n = 1 << 18  # 1 MiB
    p = _torch_zip(tmp_path / "one.pth", _sd(_tensor(0, (n,), (1,), n)), storage=np.ones(n, "<f4").tobytes())
    assert load_checkpoint(p).state_dict["w0"].sum() == n
    monkeypatch.setenv("FLAXDET_MAX_CHECKPOINT_MB", "1")
    assert "FLAXDET_MAX_CHECKPOINT_MB" in _refused(p, "memory budget")
    monkeypatch.delenv("FLAXDET_MAX_CHECKPOINT_MB")
    _refused(p, "memory budget", max_bytes=1 << 20)


def test_small_expansions_still_load(tmp_path):
    """torch.save keeps expand()ed tensors as stride-0 views: small ones load, with their values."""
    p = _torch_zip(tmp_path / "small.pth", _sd(_tensor(1, (3, 4), (0, 1), 5)),
                   storage=np.arange(5, dtype="<f4").tobytes())
    w = load_checkpoint(p).state_dict["w0"]
    assert w.shape == (3, 4) and (w == np.arange(1, 5, dtype=np.float32)).all()
