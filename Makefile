# The two commands a newcomer runs: `make run` (the service) and `make test` (the tests).
# With DATABASE_URL / BROKER_URL unset, both use the embedded PostgreSQL and Redis.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: bench setup run serve migrate test unit lint embedded-start embedded-stop clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Etsy's StatsD daemon, for the metrics test (skipped, with its reason, where npm is missing).
STATSD := .state/npm/node_modules/statsd/stats.js
$(STATSD):
	@if command -v npm >/dev/null 2>&1; then \
		mkdir -p .state/npm && npm install --silent --no-audit --no-fund --prefix .state/npm statsd@0.9.0; \
	else echo "npm not found: the StatsD daemon test will be skipped"; fi

## setup: make the virtual environment and install the project with its dev tools
setup: $(BIN)/.installed $(STATSD)

## run: the demo: every documented job on a real worker, with a summary (stops what it starts)
run: setup
	$(BIN)/python -m app.demo

# What `make serve` runs from the Procfile: the worker and beat, and the development SMTP
# server and payment gateway the jobs talk to unless SMTP_HOST / PAYMENT_GATEWAY_URL name
# real ones (the gateway listens on GATEWAY_PORT, 8090 unless set).
GATEWAY_PORT ?= 8090
SERVE_PROCESSES := worker beat $(if $(SMTP_HOST),,smtp) $(if $(PAYMENT_GATEWAY_URL),,gateway)
SERVE_ENV := $(if $(PAYMENT_GATEWAY_URL),,PAYMENT_GATEWAY_URL=http://127.0.0.1:$(GATEWAY_PORT))

## serve: migrate, then run the Procfile's worker, beat, dev SMTP server and payment gateway
## (Ctrl-C or SIGTERM stops everything, the embedded servers too)
serve: setup
	$(SERVE_ENV) GATEWAY_PORT=$(GATEWAY_PORT) $(BIN)/python -m app.embedded run -- sh -c 'alembic upgrade head && exec honcho -f Procfile start $(SERVE_PROCESSES)'

## migrate: bring the configured (or embedded) database to the newest schema
migrate: setup
	$(BIN)/python -m app.embedded run -- alembic upgrade head

## test: the whole suite, unit and integration, against the configured or embedded servers
## (make test PYTEST_ARGS='-m "not heavy"' leaves out the long chaos and volume tests)
test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

## unit: the unit tests only (no broker, no database)
unit: setup
	$(BIN)/pytest tests/unit

## bench: the benchmarks (make bench QUICK=1 for small sizes); never part of `make test`
$(BIN)/.bench-installed: pyproject.toml $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

bench: setup $(BIN)/.bench-installed
	$(BIN)/python -m bench.run $(if $(QUICK),--quick,)

## lint: ruff and mypy
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

embedded-start: setup
	$(BIN)/python -m app.embedded start

embedded-stop: setup
	$(BIN)/python -m app.embedded stop

clean: embedded-stop
	rm -rf $(VENV) .state
