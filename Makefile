# The two commands of the README, plus benchmarks. Everything installs into
# .venv from nothing; torch is installed first, alone, and pinned after that.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PIP    := $(VENV)/bin/python -m pip
EXTRAS ?= test,ray,monarch,demo

.PHONY: setup demo test test-main test-td014 bench bench-env clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@$(VENV)/bin/python -c "import torch, tensordict; print('torch', torch.__version__, '| tensordict', tensordict.__version__)"
	touch $@

demo: setup  ## train CartPole-v1 with actors served by rlserve
	OMP_NUM_THREADS=1 $(VENV)/bin/rlserve demo

test: test-main test-td014  ## the whole suite, then its core again on the oldest supported tensordict

test-main: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest

# The core, the contract over every transport, the collector and the torchrl parity
# scenarios (against the real torchrl 0.14.1, Ray included) on tensordict 0.14.3.
TD014_TESTS = tests/test_threading_core.py tests/test_reliability.py tests/test_races.py \
	tests/test_batching_policy.py tests/test_fastpath.py tests/test_weight_sync.py \
	tests/test_weight_sync_mp.py tests/test_mp_transport.py tests/test_mp_reliability.py tests/test_wire_codec.py \
	tests/test_turns.py tests/test_contract.py tests/test_hostile.py tests/test_collector.py \
	tests/test_collector_torchrl.py tests/test_torchrl_parity.py

test-td014: .venv-td014/.installed
	OMP_NUM_THREADS=1 .venv-td014/bin/python -m pytest -p no:cacheprovider $(TD014_TESTS)

.venv-td014/.installed: pyproject.toml constraints-td014.txt
	$(PYTHON) -m venv .venv-td014
	.venv-td014/bin/python -m pip install -q "$(TORCH)"
	.venv-td014/bin/python -m pip install -q -c constraints-td014.txt -e ".[test,ray]" torchrl==0.14.1
	@.venv-td014/bin/python -c "import tensordict; print('tensordict', tensordict.__version__)"
	touch $@

bench: setup  ## every benchmark, one table (see README: Performance)
	OMP_NUM_THREADS=1 $(VENV)/bin/rlserve bench

# torchrl 0.14.1 (tensordict 0.14.3) beside rlserve, for side-by-side figures
bench-env: .venv-bench/.installed
.venv-bench/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q "$(TORCH)"
	.venv-bench/bin/python -m pip install -q -c constraints-bench.txt torchrl==0.14.1 ray==2.60.0 "gymnasium>=1.0" -e .
	touch $@

clean:
	rm -rf $(VENV) .venv-bench .venv-td014
