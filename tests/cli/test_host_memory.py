"""flaxdet.host_memory: the ``flaxdet`` command restarts itself once with glibc's huge-page tunable, keeps the
user's own tunables, and leaves Python callers and FLAXDET_HUGEPAGES=0 alone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flaxdet import host_memory

GLIBC, THP = (2, 36), "madvise"


def test_env_extends_the_users_tunables():
    env = host_memory.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}, thp=THP, glibc=GLIBC)
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
    assert host_memory.active(env) and not host_memory.active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert host_memory.hugepage_env({}, thp="always", glibc=GLIBC) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("environ, thp, glibc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, THP, GLIBC),  # the user's own choice stands
    ({"FLAXDET_HUGEPAGES": "0"}, THP, GLIBC),  # opted out
    ({}, "never", GLIBC),  # the kernel gives none
    ({}, None, GLIBC),  # no THP sysfs file (not Linux, containers without it)
    ({}, THP, (2, 34)),  # glibc without the tunable
])
def test_env_left_alone(environ, thp, glibc):
    assert host_memory.hugepage_env(environ, thp=thp, glibc=glibc) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(f)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


SHOW = ("import os, sys; sys.argv = ['flaxdet', 'presets']; from flaxdet.cli import main; rc = main(); "
        "print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''), rc)")


def _run(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FLAXDET_HUGEPAGES")}
    r = subprocess.run([sys.executable, "-c", SHOW], env=dict(env, **extra), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "mask_rcnn_r50" in r.stdout  # the command ran, once
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(host_memory.hugepage_env({}) is None, reason="no transparent huge pages for glibc here")
def test_command_restarts_with_huge_pages_once():
    assert _run() == "TUNABLES=glibc.malloc.hugetlb=1 0"
    both = "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    assert _run(GLIBC_TUNABLES="glibc.malloc.arena_max=4") == f"TUNABLES={both} 0"
    assert _run(FLAXDET_HUGEPAGES="0") == "TUNABLES= 0"


def test_python_callers_are_not_restarted():
    code = ("import os; from flaxdet.cli import main; rc = main(['presets']); "
            "print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''), rc)")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "TUNABLES= 0"
