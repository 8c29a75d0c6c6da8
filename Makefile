# The README's commands. Each one creates .venv if it is missing and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test bench data venv clean mutation

$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed-dev

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(PY) -m pip install -q -e '.[dev,bench]'
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

test: venv data
	$(PY) -m pytest -q -p no:cacheprovider

# Mutation testing (tools/mutation, docs/TESTING.md): not part of `test`; ~25 min on 2 cores.
# MUTANTS judged per target, SEED of the sample, WORKERS in parallel, TARGETS (comma-separated:
# kernels,ops,tensor,optim,sparsity; default all), REV (a git revision instead of the working tree).
MUTANTS ?= 60
SEED    ?= 0
WORKERS ?= 2
mutation: venv
	MUTANTS=$(MUTANTS) SEED=$(SEED) WORKERS=$(WORKERS) TARGETS=$(TARGETS) REV=$(REV) \
		$(PY) tools/mutation/run.py

bench: $(VENV)/.installed-bench
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_kernels.py --out bench/RESULTS.md
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_train.py --out bench/RESULTS.md
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_conv.py --out bench/RESULTS.md
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/bench_srigl.py --out bench/RESULTS.md

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
