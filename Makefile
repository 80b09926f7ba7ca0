# Duplex: `make run` starts the worker with the bundled example, `make test` checks everything.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-recovery clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=strict
	touch $(STAMP)

# The install is a strict editable one: build/__editable__.*/duplex/ links to the files in app/,
# actors/ and migrations/, so Python and mypy see them as the ``duplex`` package. A module added
# or removed changes its folder's time, and the links are made again (a few seconds).
PACKAGE_DIRS := $(shell find app actors migrations -type d -not -name __pycache__)
LINKS := $(VENV)/.linked

$(LINKS): $(STAMP) $(PACKAGE_DIRS)
	$(PY) -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict
	touch $(LINKS)

run: $(LINKS)
	$(VENV)/bin/duplex migrate
	$(VENV)/bin/duplex submit examples/order_fulfillment.toml --context '{"order": {"id": "A-1001", "items": [{"sku": "BOOK-1", "qty": 2}], "total": 42.5}}'
	$(VENV)/bin/duplex run

lint: $(LINKS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

bench: $(LINKS)
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/relay.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/batches.py
	$(PY) benchmarks/flow_control.py

# Recovery time after SIGKILL (needs PostgreSQL on 127.0.0.1:5432, and root for unshare).
bench-recovery: $(LINKS)
	$(PY) benchmarks/recovery.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache duplex.db*
