# make demo: a fresh venv, the miner, and one simulated validator task end to end (offline).
# make test: the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
# CPU machines: the local CPU build. GPU hosts: `make TORCH="torch==<ver>"` or preinstall CUDA torch.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo demo-tournament test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	rm -rf .miner-demo
	RAY_AUTH_MODE=disabled MINER_STATE_DIR=.miner-demo $(BIN)/miner simulate --minutes 3 \
		--miner-url http://127.0.0.1:7997

# the tournament entrypoint as a validator runs it, on the bundled task (add SANDBOX=--sandbox as root)
demo-tournament: $(BIN)/.installed
	RAY_AUTH_MODE=disabled MINER_STATE_DIR=.miner-demo $(BIN)/miner simulate --tournament --minutes 3 $(SANDBOX)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	RAY_AUTH_MODE=disabled OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q --durations=12 tests

clean:
	rm -rf $(VENV) .miner-demo
