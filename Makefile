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
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: install          ## start Kafka + Prefect server (UI http://127.0.0.1:4200) in the background
	$(PY) -m infra up

down:                ## stop what `make up` started
	@if [ -x $(PY) ]; then $(PY) -m infra down; fi

status: install
	$(PY) -m infra status

demo: install        ## the whole system on one machine, a summary, then a clean stop
	$(PY) -m infra demo $(DEMO_ARGS)

test: install        ## the whole suite against a real broker and a Prefect test harness
	$(PY) -m infra kafka-fetch
	$(PY) -m pytest $(PYTEST_ARGS)

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
