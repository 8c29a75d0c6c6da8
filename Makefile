# The README's commands. Each one creates .venv if it is missing and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-gpu bench data venv clean mutation deepsparse-venv

$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,progress]'
	touch $@

venv: $(VENV)/.installed-dev

# What the test suite exercises beyond the core: the progress bar, the HTTP server (serve), safetensors and the
# CPU build of PyTorch (convert's round trip), numba-cuda with NVVM (simulator and PTX tests), mpi4py with the
# MPICH wheel and dask.distributed (2-rank and sweep tests). Without these the tests that need them skip.
$(VENV)/.installed-test: $(VENV)/.installed-dev
	$(PY) -m pip install -q -e '.[dev,progress,serve,convert,cuda,distributed]' torch==2.13.0
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PY) -m pip install -q -e '.[dev,bench,serve,progress]'
	@command -v wrk >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } || \
		echo "wrk (bench_serve.py load generator) is missing: apt-get install wrk"
	touch $@

# Fashion-MNIST from Debian (as root with apt-get), else say how to get it.
data:
	@if [ -f $(DATA) ] || [ -n "$$FANIN_DATA" ]; then echo "Fashion-MNIST: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
		sudo apt-get update -qq; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist, or run" \
		"'$(PY) -m fanin.cli download' (needs a network), or set FANIN_DATA to a folder with the four .gz files."; \
	fi

demo: venv data
	$(VENV)/bin/fanin train --data fashion-mnist --model mlp --epochs 10

test: $(VENV)/.installed-test data
	$(PY) -m pytest -q -p no:cacheprovider

# The real-GPU checks of issue 14 (tests/test_cuda_device.py, PTX, bench/bench_cuda.py) on a machine with an NVIDIA
# GPU: tools/gpu_check.sh writes its logs to gpu-out/.
test-gpu: $(VENV)/.installed-test
	PY=$(PY) bash tools/gpu_check.sh

# Mutation testing (tools/mutation, docs/TESTING.md): not part of `test`; ~25 min on 2 cores.
# MUTANTS judged per target, SEED of the sample, WORKERS in parallel, TARGETS (comma-separated:
# kernels,ops,tensor,optim,sparsity,w8a8; default all), REV (a git revision instead of the working tree).
MUTANTS ?= 60
SEED    ?= 0
WORKERS ?= 2
mutation: venv
	MUTANTS=$(MUTANTS) SEED=$(SEED) WORKERS=$(WORKERS) TARGETS=$(TARGETS) REV=$(REV) \
		$(PY) tools/mutation/run.py

bench: $(VENV)/.installed-bench deepsparse-venv
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_kernels.py --out bench/RESULTS.md
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_train.py --out bench/RESULTS.md
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_conv.py --out bench/RESULTS.md
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_srigl.py --out bench/RESULTS.md
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_inference.py --out bench/RESULTS.md
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_serve.py --out bench/RESULTS.md

# DeepSparse 1.8.0 (a contender of bench/bench_inference.py) has wheels for CPython 3.11 only and pins
# onnx < 1.15, hence NumPy 1.x: it gets its own virtualenv, driven by bench/deepsparse_worker.py. This target
# never fails: when the install does not work, DS_VENV/INSTALL_FAILED says why and the benchmark reports
# DeepSparse as skipped with that reason.
PYTHON311 ?= python3.11
DS_VENV   := .venv-deepsparse
deepsparse-venv:
	@mkdir -p $(DS_VENV) && echo '*' > $(DS_VENV)/.gitignore
	@if [ -f $(DS_VENV)/.installed ]; then echo "DeepSparse: $(DS_VENV) is ready"; \
	elif ! command -v $(PYTHON311) >/dev/null 2>&1; then \
		echo "$(PYTHON311) not found: deepsparse 1.8.0 has wheels for CPython 3.11 only" | tee $(DS_VENV)/INSTALL_FAILED; \
	elif { test -x $(DS_VENV)/bin/python || $(PYTHON311) -m venv $(DS_VENV); } > $(DS_VENV)/install.log 2>&1 \
		&& $(DS_VENV)/bin/python -m pip install deepsparse==1.8.0 >> $(DS_VENV)/install.log 2>&1 \
		&& $(DS_VENV)/bin/python bench/deepsparse_worker.py --selftest >> $(DS_VENV)/install.log 2>&1; then \
		rm -f $(DS_VENV)/INSTALL_FAILED; touch $(DS_VENV)/.installed; echo "DeepSparse: installed into $(DS_VENV)"; \
	else { echo "installing deepsparse==1.8.0 into $(DS_VENV) failed:"; grep -v '^WARNING: Location' $(DS_VENV)/install.log | tail -n 4; } \
		| tee $(DS_VENV)/INSTALL_FAILED; fi

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
