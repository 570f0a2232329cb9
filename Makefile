# Two commands set everything up on a fresh machine:
#   make demo   - create .venv if missing, install, run the main example
#   make test   - create .venv if missing, install, run the whole test suite
# Both are idempotent: the install step is skipped while .venv/.stamp-<hash> matches
# the hash of pyproject.toml + constraints.txt.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.stamp-$(HASH)
CORE_VENV := .venv-core
CORE_STAMP := $(CORE_VENV)/.stamp-$(HASH)
export MLFLOW_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo test test-core test-full bench clean screenshots

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "pip>=23,<26" "setuptools<70" wheel
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.stamp-*
	touch $@

# A second, minimal environment: the core with numpy 2.x and nothing optional.
$(CORE_STAMP): pyproject.toml constraints.txt
	test -x $(CORE_VENV)/bin/python || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet "numpy>=2" "matplotlib>=3.8" pytest pytest-timeout hypothesis
	$(CORE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	rm -f $(CORE_VENV)/.stamp-*
	touch $@

demo: $(STAMP)
	$(PY) examples/demo.py

test: test-full test-core

test-full: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-core: $(CORE_STAMP)
	$(CORE_VENV)/bin/python -m pytest -q -p no:cacheprovider -m core tests/test_grouping.py tests/test_extreme_values.py tests/test_optional_imports.py tests/test_fuzz.py tests/test_tracker.py tests/test_quantiles.py tests/test_ci.py tests/test_run.py

bench: $(STAMP)
	$(PY) benchmarks/bench_grouping.py
	$(PY) benchmarks/bench_tensorboard.py
	$(PY) benchmarks/bench_mlflow.py
	$(PY) benchmarks/bench_figures.py
	$(PY) benchmarks/bench_fe_trace.py
	$(PY) benchmarks/bench_distributed.py

# README pictures: band figures, and screenshots of TensorBoard / MLflow on the demo's output
# (needs Debian's chromium: apt-get install chromium).
screenshots: demo
	$(PY) examples/make_readme_images.py
	$(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) $(CORE_VENV) build *.egg-info
