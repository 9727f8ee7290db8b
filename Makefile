# Two commands for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
# Both create .venv and install what they need when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
VENV_FLAGS ?=
SGLANG_DEFAULT := 0.5.23
SGLANG ?=

.PHONY: venv demo test test-fast bench bench-cluster compat clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# sglang 0.5.23 pins torch 2.14.1; install it with its torchvision first (both resolve from local disk here)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q sglang==$(SGLANG_DEFAULT)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sglang_ckpt_plugin.demo.run

test: $(STAMP)
	scripts/cluster_tools.sh  # the cluster tests' namespaces, loop devices and Mooncake's libibverbs
	$(BIN)/python -m pytest tests -v --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -v -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/node_bench.py
	$(BIN)/python bench/watch_bench.py
	$(BIN)/python bench/ready_bench.py
	$(BIN)/python bench/push_bench.py
	$(BIN)/python bench/two_phase_bench.py

# the spec's multi-node speed-up on a cluster in one box (root: network namespaces, loop devices, blkio cgroups)
bench-cluster: $(STAMP)
	scripts/cluster_tools.sh
	$(BIN)/python bench/cluster_bench.py

# the end-to-end smoke against another SGLang release, in its own environment: make compat SGLANG=0.5.22
compat:
	@test -n "$(SGLANG)" || { echo "usage: make compat SGLANG=<release>, e.g. SGLANG=0.5.22"; exit 2; }
	scripts/compat.sh $(SGLANG) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-sglang-* .pytest_cache .hypothesis .artifacts
