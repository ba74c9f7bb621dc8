# tfkl: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv data demo test test-all clean torch-venv bench report

$(STAMP): requirements.txt requirements-tff.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	# TFF 0.87.0 pins jaxlib==0.4.14, gone from PyPI: install it without its resolver.
	$(VENV)/bin/pip install -q --no-deps -r requirements-tff.txt
	touch $@

venv: $(STAMP)

data:
	@bash scripts/install_data.sh

demo: venv data
	$(PY) -m tff_programs.demo --root_dir=runs/demo

test: venv data
	$(PY) -m pytest -q tests

test-all: venv data
	$(PY) -m pytest -q -m "" tests

# PyTorch for the comparison benchmarks only, in its own venv (never in $(VENV)).
TORCH_VENV ?= .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.installed
$(TORCH_STAMP):
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q torch==2.13.0 numpy
	touch $@

torch-venv: $(TORCH_STAMP)

# All benchmarks -> benchmarks/results/*.json + README.md; BENCH_FLAGS="--quick" or "--only=a,b".
bench: venv data torch-venv
	$(PY) -m benchmarks.run $(BENCH_FLAGS)

report: venv
	$(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) runs .pytest_cache
