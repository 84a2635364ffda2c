# The README's two commands are `make demo` and `make test`; both work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install up down status demo test test-unit lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,dask]'
	touch $(STAMP)

install: $(STAMP)

# `make up WORKERS=1`: also every stream worker (`python -m stream_workers all`) in the background.
WORKERS ?=

up: install          ## start Kafka + Prefect server (UI http://127.0.0.1:4200) in the background
	$(PY) -m infra up $(if $(filter-out 0 no false,$(WORKERS)),--workers)

down:                ## stop what `make up` started (the stream workers first, cleanly)
	@if [ -x $(PY) ]; then $(PY) -m infra down; fi

status: install      ## Kafka, Prefect, each stream worker process and each group's lag
	$(PY) -m infra status

demo: install        ## the whole system on one machine, a summary, then a clean stop
	$(PY) -m infra demo $(DEMO_ARGS)

test: install browser  ## the whole suite against a real broker and a Prefect test harness
	$(PY) -m infra kafka-fetch
	$(PY) -m pytest $(PYTEST_ARGS)

# Playwright drives Debian's chromium in the UI test (it cannot download a browser here);
# `apt-get update` only when the install fails without it.
.PHONY: browser
browser:             ## Debian's chromium for tests/integration/test_ui.py, when missing
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; \
	  else echo "chromium is missing: install it as root (apt-get install -y chromium)" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null 2>&1 || { \
	    echo "chromium is missing and there is no apt-get: install Chromium as 'chromium' on PATH" >&2; exit 1; }; \
	  echo "installing Debian's chromium for the UI test"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium 2>/dev/null \
	  || { $$sudo apt-get update -qq \
	       && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	  || { echo "could not install chromium (apt-get install -y chromium); the UI test needs it" >&2; \
	       exit 1; }; }

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install       ## every benchmark; each prints ratios against its own baseline
	@for b in bench/*.py; do case $$b in */__init__.py) ;; *) echo "== $$b"; $(PY) $$b || exit 1;; esac; done

clean: down
	rm -rf var data .pytest_cache .ruff_cache
