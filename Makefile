# flaxdet: `make demo` and `make test` each create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)
# Known-good PyTorch pair (torchvision's NMS/RoIAlign are visdet's ops). pip takes both from the
# machine's local package mirror when present.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_WORKERS ?= 2
# The `onednn_conv` fast path's library: oneDNN's convolutions called from XLA (flaxdet/fast_paths/onednn.py).
NATIVE := flaxdet/fast_paths/native/libflaxdet_onednn.so
NATIVE_SRC := flaxdet/fast_paths/native/onednn_conv.cc flaxdet/fast_paths/native/build.sh

.PHONY: install native demo demo-rtmdet test test-slow test-all lint bench bench-quick bench-rtmdet bench-rtmdet-train clean

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.10-3.12)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[torch,dev]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP) $(NATIVE)

# g++ and oneDNN's headers (Debian's libdnnl-dev, apt-get installed when missing and run as root); without them
# build.sh says so and flaxdet runs XLA's own convolutions.
$(NATIVE): $(NATIVE_SRC) $(STAMP)
	@bash flaxdet/fast_paths/native/build.sh $(PY)

native: $(NATIVE)

demo: $(STAMP) $(NATIVE)
	$(PY) -m flaxdet.demo

# The same story on a tiny RTMDet-Ins (out/demo-rtmdet): upstream's recipe (rtmdet_adamw, EMA), 400 steps.
demo-rtmdet: $(STAMP) $(NATIVE)
	$(PY) -m flaxdet.demo --family rtmdet_ins

test: $(STAMP) $(NATIVE)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

test-slow: $(STAMP) $(NATIVE)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m slow

test-all: $(STAMP) $(NATIVE)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m 'slow or not slow'

# ruff (the `dev` extra), configured in pyproject.toml [tool.ruff].
lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out build *.egg-info $(NATIVE)

# Every benchmark (convert, inference R50 + Swin-S, training step), then benchmarks/results/SUMMARY.md.
# About an hour on a 2-core CPU: run it on an otherwise idle machine. bench-quick: smoke run (small inputs).
bench: $(STAMP) $(NATIVE)
	$(PY) benchmarks/run_all.py

bench-quick: $(STAMP) $(NATIVE)
	$(PY) benchmarks/run_all.py --quick

# RTMDet-tiny/-s/-l and RTMDet-Ins-s at 640x640: PyTorch eager, ONNX Runtime (the `bench` extra) and flaxdet.
bench-rtmdet: $(STAMP) $(NATIVE)
	$(PY) -m pip install -q -e '.[torch,dev,bench]'
	$(PY) benchmarks/bench_rtmdet.py

# RTMDet-s train step at 640x640, batch 8: reference/ PyTorch (loss, backward, AdamW) vs flaxdet's jitted step,
# each side in its own process (peak RSS). Run it on an otherwise idle machine. Options: --help.
bench-rtmdet-train: $(STAMP) $(NATIVE)
	$(PY) benchmarks/bench_rtmdet_train.py
