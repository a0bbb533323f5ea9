"""Host memory: transparent huge pages for the large buffers XLA:CPU allocates on every call.

XLA:CPU takes each call's buffers (a train step's scratch is several GB: 3.6 GB for RTMDet-s at 640x640,
batch 8) from glibc's ``malloc``, which maps blocks that large freshly from the kernel on every call and
unmaps them after: every 4 KiB page is faulted in and zeroed again on each call. Measured on a 2-vCPU
EPYC (Linux 6.18, glibc 2.36): ~1.0 million page faults and ~1.6 s of kernel time per RTMDet-s train step.
With glibc's ``glibc.malloc.hugetlb=1`` tunable those blocks are advised to the kernel as transparent
huge pages (2 MiB): ~5 thousand faults per step, and the step 5.0 -> 3.4 s in the same session (Mask
R-CNN R50 inference at 800x1333 with 100 detections 1.81 -> 1.60 s), the same peak RSS, the same values.

glibc reads its tunables once, at process start, so the ``flaxdet`` command re-executes itself with
``GLIBC_TUNABLES`` extended (:func:`reexec_with_hugepages`, before any import of JAX). In your own
Python process, start Python with the variable set::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py

``FLAXDET_HUGEPAGES=0`` turns the re-execution off. Nothing happens where it cannot help: not Linux,
not glibc >= 2.35, or transparent huge pages set to ``never``
(``/sys/kernel/mm/transparent_hugepage/enabled``).
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "FLAXDET_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def hugepage_env(environ=None, thp: str | None = "read", glibc=None) -> dict | None:
    """``environ`` (default ``os.environ``) with ``GLIBC_TUNABLES`` extended by ``glibc.malloc.hugetlb=1``;
    None where that would not help or was already chosen: not Linux, glibc older than 2.35, THP ``never``
    or unknown, ``FLAXDET_HUGEPAGES=0``, or ``GLIBC_TUNABLES`` already naming the tunable (also the
    user's own value, which is kept)."""
    environ = os.environ if environ is None else environ
    thp = thp_mode() if thp == "read" else thp
    glibc = glibc_version() if glibc is None else glibc
    if (not sys.platform.startswith("linux") or environ.get(OPT_OUT, "1") == "0" or glibc is None
            or glibc < (2, 35) or thp not in ("always", "madvise")):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None
    return dict(environ, GLIBC_TUNABLES=f"{current}:{SETTING}" if current else SETTING)


def active(environ=None) -> bool:
    """Whether this process started with huge pages for malloc's large blocks."""
    environ = os.environ if environ is None else environ
    return SETTING in environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_hugepages() -> None:
    """Replace this process by the same command with :func:`hugepage_env`'s environment; return (doing
    nothing) where that does not apply or the exec fails. Call it first thing, before threads or output."""
    env = hugepage_env()
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv or not sys.executable:
        return
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return
