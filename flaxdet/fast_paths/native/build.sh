#!/usr/bin/env bash
# Builds flaxdet/fast_paths/native/libflaxdet_onednn.so, the `onednn_conv` fast path's library (`make native`):
# onednn_conv.cc against the system's oneDNN (Debian: libdnnl-dev, installed with apt-get when missing and this
# runs as root) and the XLA FFI headers that jaxlib ships. Without g++ or oneDNN it says so and builds nothing:
# flaxdet then runs XLA's own convolutions (the plain path).
#   usage: build.sh PYTHON
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${1:-python3}"
out="$here/libflaxdet_onednn.so"
header=/usr/include/oneapi/dnnl/dnnl.hpp
if [ ! -f "$header" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "native: installing oneDNN (apt-get install libdnnl-dev)"
  apt-get install -y -q libdnnl-dev >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libdnnl-dev >/dev/null 2>&1; }
fi
if [ ! -f "$header" ] || ! command -v g++ >/dev/null; then
  echo "native: oneDNN headers ($header) or g++ missing: the onednn_conv fast path stays off" >&2
  exit 0
fi
inc="$("$py" -c 'import jax; print(jax.ffi.include_dir())')" || exit 1
if g++ -O2 -std=c++17 -shared -fPIC -w -I"$inc" "$here/onednn_conv.cc" -o "$out.tmp" -ldnnl; then
  mv "$out.tmp" "$out" && echo "native: built $out"
else  # not fatal: flaxdet runs XLA's convolutions (CI's FLAXDET_REQUIRE_NATIVE=1 makes the tests say so)
  rm -f "$out.tmp"
  echo "native: building $out failed (above): the onednn_conv fast path stays off" >&2
fi
