# kjumpd: `make test` runs every tier (unit, sysroot, VM); `make demo` runs the main job.
PY := .venv/bin/python
export KJUMPD_CACHE ?= $(HOME)/.cache/kjumpd

.PHONY: setup lint test test-unit test-sysroot test-vm vm-assets demo bench bench-vm soak fuzz clean

setup:
	@tools/setup.sh

vm-assets: setup
	@$(PY) -m tests.vm.assets

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: setup lint vm-assets
	$(PY) -m pytest -ra --durations=30 tests

test-unit: setup
	$(PY) -m pytest -ra tests/unit

test-sysroot: setup
	$(PY) -m pytest -ra tests/sysroot

test-vm: setup vm-assets
	$(PY) -m pytest -ra --durations=30 tests/vm

demo: setup vm-assets
	$(PY) -m tests.vm.demo

bench: setup
	$(PY) -m bench.pipeline

bench-vm: setup vm-assets
	$(PY) -m bench.vm

# N hibernate/restore cycles of one VM (CYCLES=50); not part of `make test`
CYCLES ?= 50
soak: setup vm-assets
	$(PY) -m tests.vm.soak --cycles $(CYCLES)

# every parser of bytes from a disk or from A, FUZZ_RUNS inputs each (atheris: the [fuzz] extra)
FUZZ_RUNS ?= 100000
fuzz: setup
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q -e '.[test,fuzz]'
	$(PY) -m tests.fuzz --runs $(FUZZ_RUNS)

clean:
	rm -rf .venv build *.egg-info .pytest_cache
