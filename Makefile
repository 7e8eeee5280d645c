# Two commands on a fresh machine (README): `make demo` and `make test`. Each sets up .venv,
# installs the pinned requirements, builds the C++ extension and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup install build test lint docs demo bench bench-ops bench-e2e env clean gpu-check check-cuda-build

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

# The docs site (mkdocs.yml, docs/): built offline into build/site, warnings as errors, so that a
# broken link or an unreadable docstring fails. The API pages read the source, nothing is imported.
$(VENV)/.docs: requirements/docs.txt $(VENV)/.requirements
	$(PIP) install -r requirements/docs.txt
	touch $@

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site

demo: install
	$(PY) -m fastbert_kernels demo

# Interleaved, repeated, allocator pinned: ratios with their spread (benchmarks/results/ops.md).
bench-ops: install
	$(PY) benchmarks/bench_ops.py --out benchmarks/results

bench-e2e: install
	$(PY) -m fastbert_kernels bench

bench: bench-ops bench-e2e

env: install
	$(PY) -m fastbert_kernels env

# On a machine with a GPU (no venv, no network: the interpreter found there, with its own CUDA
# torch): the staged check of benchmarks/gpu_check.py. It builds the extension itself, for this
# GPU's architecture only, as one of its stages, so a failed build still leaves the Triton and
# torch backends measured; it needs neither make nor ninja (`python3 benchmarks/gpu_check.py` is
# the same). One report in $$OUT (the device tool's output folder) or benchmarks/results.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out "$${OUT:-benchmarks/results}"

# Without a GPU: the pins resolve with the CUDA build of torch (which requires its own triton),
# and the CUDA extension compiles and links against it with the system nvcc and imports with a
# clean fallback. A separate venv whose pip ignores this machine's local CPU wheel; the build goes
# to a scratch folder so the CPU build in fastbert_kernels/ is untouched.
CUDA_VENV ?= .venv-cuda
# torch finds the toolkit from CUDA_HOME, else from nvcc's folder; on machines whose nvcc on PATH
# is a wrapper (here /usr/local/bin/nvcc) that guess is wrong, so default to /usr/local/cuda.
CUDA_HOME ?= $(shell test -d /usr/local/cuda && echo /usr/local/cuda)
export CUDA_HOME
CUDA_PIP := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(CUDA_VENV)/bin/python -m pip --disable-pip-version-check -q --no-cache-dir
check-cuda-build:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PIP) install --dry-run --ignore-installed -r requirements/test.txt -r requirements/demo.txt
	$(CUDA_PIP) install -r requirements/base.txt
	$(CUDA_VENV)/bin/python -c "import torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__)"
	rm -rf build/cuda-check && mkdir -p build/cuda-check/pkg
	MAX_JOBS=2 $(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda-check/lib --build-temp build/cuda-check/tmp
	# PTX of the newest architecture must be embedded (cuobjdump ships with triton's NVIDIA backend).
	$$(find $(CUDA_VENV) -path '*nvidia/bin/cuobjdump' | head -n 1) --list-ptx build/cuda-check/lib/fastbert_kernels/_C*.so \
		| grep -q 'sm_90.ptx'
	cp -r fastbert_kernels build/cuda-check/pkg/ && rm -f build/cuda-check/pkg/fastbert_kernels/_C*.so
	cp build/cuda-check/lib/fastbert_kernels/_C*.so build/cuda-check/pkg/fastbert_kernels/
	cd build/cuda-check/pkg && ../../../$(CUDA_VENV)/bin/python -c "from fastbert_kernels.ops import compiled, report; \
		assert compiled.LOAD_ERROR is None and compiled.BUILD_INFO['cuda'], compiled.LOAD_ERROR; \
		print('CUDA build', compiled.BUILD_INFO); print(report())"

clean:
	rm -rf build *.egg-info fastbert_kernels/_C*.so $(VENV)/.built
