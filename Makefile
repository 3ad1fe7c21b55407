# rankone — developer commands. `make install` once, then `make test`, `make demo`, `make lint`.
PY ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
PIP_FLAGS ?= $(shell [ -d /opt/wheels ] && echo --find-links /opt/wheels)

.PHONY: install test lint format demo bench serve deploy-check

install:
	[ -x .venv/bin/python ] || python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q $(PIP_FLAGS) -c constraints.txt -e ".[dev]"

test:
	$(PY) -m pytest -q tests

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo:
	$(PY) -m rankone_cli demo

serve:
	$(PY) -m rankone_cli serve

bench:
	$(PY) -m bench.run_all

# Engine-free deployment checks: compose resolves, hadolint, clean-venv install + imports.
deploy-check:
	bash docker/check.sh
