# tfkl: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv data demo test test-all clean torch-venv bench report lint latest-venv test-core-latest

$(STAMP): requirements.txt requirements-tff.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	# TFF 0.87.0 pins jaxlib==0.4.14, gone from PyPI: install it without its resolver.
	$(VENV)/bin/pip install -q --no-deps -r requirements-tff.txt
	# tfkl itself (editable): the console scripts tfkl-train, tfkl-attack, ... and imports without PYTHONPATH.
	$(VENV)/bin/pip install -q --no-deps -e .
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

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The core (tfkl without tfkl.federated, attacks) on today's TensorFlow with tf_keras, in its own venv on the newest
# Python that TensorFlow supports (a python3.13 on PATH, else pyenv's): requirements-latest.txt.
LATEST_VENV ?= .venv-latest
LATEST_STAMP := $(LATEST_VENV)/.installed
LATEST_PYTHON ?= $(shell (python3.13 -c 'import sys; print(sys.executable)' || \
	PYENV_VERSION=$$(pyenv versions --bare | grep '^3\.13' | tail -1) python3.13 -c 'import sys; print(sys.executable)') \
	2>/dev/null)
CORE_TESTS := tests/test_package.py tests/test_keylock.py tests/test_secure_and_models.py tests/test_attacks.py \
	tests/test_lbfgs.py tests/test_data.py tests/test_attack_binary.py tests/test_train_central.py tests/test_prior.py

$(LATEST_STAMP): requirements-latest.txt pyproject.toml
	@test -n "$(LATEST_PYTHON)" || { echo "error: no python3.13 found (set LATEST_PYTHON=...)"; exit 1; }
	$(LATEST_PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	# tensorflow-datasets: tfkl.data's optional source='tfds' (tests/test_data.py)
	$(LATEST_VENV)/bin/pip install -q -c requirements-latest.txt -e ".[dev]" tensorflow-datasets
	touch $@

latest-venv: $(LATEST_STAMP)

test-core-latest: latest-venv data
	$(LATEST_VENV)/bin/python -m pytest -q $(CORE_TESTS)

# PyTorch for the comparison benchmarks only, in its own venv (never in $(VENV)).
TORCH_VENV ?= .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.installed
$(TORCH_STAMP):
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q torch==2.13.0 numpy
	touch $@

torch-venv: $(TORCH_STAMP)

# All benchmarks -> results/*.json + results/README.md; BENCH_FLAGS="--quick" or "--only=a,b".
bench: venv data torch-venv
	$(PY) -m experiments.run $(BENCH_FLAGS)

# Generated documents, redrawn from results/*.json: docs/figures/*.png, then docs/REPORT.md.
report: venv
	$(PY) -m experiments.report.figures
	$(PY) -m experiments.report.document

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache *.egg-info build

# Remote TFF workers (docs/workers.md): start them, then pass the printed --workers=... to
# tff_programs.train / evaluate; stop them by PID with SIGTERM. PIDs and logs go to $(WORKER_DIR).
WORKER_PORTS ?= 18501 18502
WORKER_DIR ?= runs/workers

.PHONY: workers stop-workers bench-workers bazel-install bazel-test

workers: venv
	@mkdir -p $(WORKER_DIR)
	@for port in $(WORKER_PORTS); do \
	  pidfile=$(WORKER_DIR)/$$port.pid; \
	  if [ -f $$pidfile ] && grep -qs worker_binary /proc/$$(cat $$pidfile)/cmdline; then \
	    echo "TFF worker on port $$port already running (pid $$(cat $$pidfile))"; continue; fi; \
	  nohup $(PY) -m tff_programs.worker --port=$$port > $(WORKER_DIR)/$$port.log 2>&1 & echo $$! > $$pidfile; \
	done; \
	sleep 2; \
	for port in $(WORKER_PORTS); do \
	  pid=$$(cat $(WORKER_DIR)/$$port.pid); \
	  if kill -0 $$pid 2>/dev/null; then echo "TFF worker on port $$port: pid $$pid, log $(WORKER_DIR)/$$port.log"; \
	  else echo "error: TFF worker on port $$port did not start:"; cat $(WORKER_DIR)/$$port.log; rm -f $(WORKER_DIR)/$$port.pid; exit 1; fi; \
	done; \
	echo "--workers=$$(for port in $(WORKER_PORTS); do printf '127.0.0.1:%s,' $$port; done | sed 's/,$$//')"

stop-workers:
	@for pidfile in $(WORKER_DIR)/*.pid; do \
	  [ -f $$pidfile ] || continue; pid=$$(cat $$pidfile); \
	  if grep -qs worker_binary /proc/$$pid/cmdline && kill -TERM $$pid; then \
	    for i in $$(seq 20); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
	    if kill -0 $$pid 2>/dev/null; then kill -KILL $$pid; fi; \
	    echo "stopped TFF worker pid $$pid"; fi; \
	  rm -f $$pidfile; \
	done

# Round time on the local context vs 1 and 2 workers -> results/workers.json.
bench-workers: venv data
	$(PY) -m experiments.run --only=workers $(BENCH_FLAGS)

# Bazel 4.2.3 from Debian's bazel-bootstrap, offline (WORKSPACE, third_party/README.md).
BAZEL ?= bazel

bazel-install:
	@if ! command -v $(BAZEL) >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing bazel-bootstrap (Debian) ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bazel-bootstrap; \
	  else echo "error: bazel is not installed (Debian: apt-get install bazel-bootstrap, as root)"; exit 1; fi; \
	fi

# The fast suite (tests marked slow stay out): one py_test per tests/test_*.py.
bazel-test: venv data bazel-install
	$(BAZEL) test //...
