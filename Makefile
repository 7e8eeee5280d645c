# Two commands on a fresh machine (README): `make demo` and `make test`. Each sets up .venv,
# installs the pinned requirements, builds the C++ extension and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup install build test lint demo bench bench-ops bench-e2e env clean

$(VENV)/.requirements: requirements/*.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/test.txt -r requirements/demo.txt
	$(PIP) install --no-deps -r requirements/assets.txt
	touch $@

setup: $(VENV)/.requirements

# --no-build-isolation: build against the torch installed above, not a freshly downloaded one.
$(VENV)/.built: $(VENV)/.requirements setup.py $(shell find csrc -type f)
	MAX_JOBS=2 $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install build: $(VENV)/.built

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m pytest tests

demo: install
	$(PY) -m fastbert_kernels demo

bench-ops: install
	$(PY) -m pytest benchmarks/test_bench_ops.py --benchmark-enable --benchmark-only \
		--benchmark-columns=min,median,mean,rounds --benchmark-json=benchmarks/results/ops.json
	$(PY) benchmarks/report_ops.py benchmarks/results/ops.json

bench-e2e: install
	$(PY) -m fastbert_kernels bench

bench: bench-ops bench-e2e

env: install
	$(PY) -m fastbert_kernels env

clean:
	rm -rf build *.egg-info fastbert_kernels/_C*.so $(VENV)/.built
