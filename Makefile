# Duplex: `make run` starts the worker with the bundled example, `make test` checks everything.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-recovery clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/duplex migrate
	$(VENV)/bin/duplex submit examples/order_fulfillment.toml --context '{"order": {"id": "A-1001", "items": [{"sku": "BOOK-1", "qty": 2}], "total": 42.5}}'
	$(VENV)/bin/duplex run

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

test: lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/relay.py

# Recovery time after SIGKILL (needs PostgreSQL on 127.0.0.1:5432, and root for unshare).
bench-recovery: $(STAMP)
	$(PY) benchmarks/recovery.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache duplex.db*
