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

.PHONY: all venv build demo test test-python test-cpp bench clean

all: build

$(VENV)/.deps: requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

venv: $(VENV)/.deps

$(STAMP): $(VENV)/.deps $(SOURCES)
	@echo "building pyllm (first build: about 6-8 minutes on 2 cores; PYLLM_CUDA=0 skips nvcc)"
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@$(PY) -c "import pyllm._C" || (echo "build failed: pyllm._C does not import"; exit 1)
	@rm -f $(VENV)/.pyllm-built-*; touch $@

build: $(STAMP)

demo: build
	$(PY) -m pyllm demo

# CI runs exactly this (see .ci/run).
test: build
	PYLLM_REQUIRE_EXT=1 $(PYTEST) tests
	PYLLM_REQUIRE_EXT=1 PYLLM_BACKEND=torch $(PYTEST) tests/test_ops.py
	PYLLM_DISABLE_EXT=1 $(PYTEST) tests/test_ops.py

bench: build
	$(PY) -m pyllm bench

clean:
	rm -rf build *.egg-info pyllm/*.so $(VENV)/.pyllm-built-*
