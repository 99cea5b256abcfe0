# The two commands of the README: `make test` and `make bench`. Both install what they need.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is pinned first: on the CPU machines 2.13.0 is the CPU build already on disk; any
# looser requirement can make pip pull a multi-GB CUDA build. Override TORCH_SPEC to reuse
# another installed torch (e.g. TORCH_SPEC=torch on a GPU host that has one).
TORCH_SPEC ?= torch==2.13.0
STAMP := .deps-installed

.PHONY: install lint test test-gpu bench bench-cpu clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,bench]"
	@touch $(STAMP)

# Lint and types first: they take seconds and fail fast.
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

test: lint
	$(PYTHON) -m pytest -q

# GPU tests only (run on the GPU hosts by bench/gpu_suite.sh).
test-gpu:
	$(PYTHON) -m pytest -q -m "gpu or multigpu"

bench: install
	$(PYTHON) -m bench.run_bench

clean:
	rm -rf $(STAMP) .pytest_cache .hypothesis build *.egg-info
