# pforte — `make run` starts the demo, `make test` runs every test. Everything else is set up on the way.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENDOR := src/pforte/web/ui/static/vendor
HOST ?= 127.0.0.1
PORT ?= 8080
DATA_DIR ?= ./pforte-data

.PHONY: run test lint unit integration browser frontend chromium clean i18n bench crash-test compliance-evidence profiler

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pforte needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(VENDOR)/htmx.min.js: package.json
	npm install --no-audit --no-fund --silent
	mkdir -p $(VENDOR)
	cp node_modules/htmx.org/dist/htmx.min.js $(VENDOR)/htmx.min.js

frontend: $(VENDOR)/htmx.min.js

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

run: $(STAMP) frontend
	$(BIN)/pforte demo --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench migrations
	$(BIN)/ruff format --check src tests bench migrations
	$(BIN)/mypy src

test: $(STAMP) frontend chromium lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/simulator

# Which tests prove which DSK row (the compliance report reads the committed file; a unit test
# fails when it is stale).
compliance-evidence: $(STAMP)
	$(BIN)/python -m pforte.compliance.evidence

i18n: $(STAMP)
	$(BIN)/pybabel extract -F babel.cfg -o /tmp/pforte-messages.pot src/pforte
	$(BIN)/pybabel update -i /tmp/pforte-messages.pot -d src/pforte/locale -D messages

# py-spy, for the benchmarks' --profile option (bench/README.md); not needed by make test.
profiler: $(BIN)/py-spy
$(BIN)/py-spy: $(STAMP)
	$(BIN)/pip install --quiet py-spy

wrk:
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

bench: $(STAMP) wrk
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# Webhook ingest with and without the audit receipts, alternating (issue 6: at most 10 % less).
.PHONY: bench-audit-overhead wrk
bench-audit-overhead: $(STAMP) wrk
	$(BIN)/python bench/audit_overhead.py --db sqlite
	$(BIN)/python bench/audit_overhead.py --db postgresql

crash-test: $(STAMP)
	$(BIN)/python bench/crash.py --db sqlite
	$(BIN)/python bench/crash.py --db postgresql

clean:
	rm -rf $(VENV) node_modules $(VENDOR) .pytest_cache .ruff_cache

# Matrix Synapse sending messages on this machine, beside pforte's figures (bench/synapse_send.py:
# Synapse in its own venv under .bench/, a fresh SQLite file / throwaway PostgreSQL database each).
SYNAPSE_ARGS ?= --seconds 10 --connections 16
.PHONY: bench-synapse
bench-synapse: $(STAMP)
	$(BIN)/python bench/synapse_send.py --db sqlite $(SYNAPSE_ARGS)
	$(BIN)/python bench/synapse_send.py --db postgresql $(SYNAPSE_ARGS)

# audit.verify over 1,000,000 chained entries with signed checkpoints (bench/audit_verify.py: bulk-seeded
# chain in a fresh SQLite file / throwaway PostgreSQL database; entries/s and peak RSS of the verify).
AUDIT_BENCH_ARGS ?= --entries 1000000
.PHONY: bench-audit-verify
bench-audit-verify: $(STAMP)
	$(BIN)/python bench/audit_verify.py --db sqlite $(AUDIT_BENCH_ARGS)
	$(BIN)/python bench/audit_verify.py --db postgresql $(AUDIT_BENCH_ARGS)
