# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs the lock first.
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
# Stages call `effnet`/`dvc` from the venv; everything stays local and offline.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export NO_MKDOCS_2_WARNING := 1  # mkdocs-material's banner about its successor, on every build
UI_PORT ?= 5000
DOCS_PORT ?= 8000
PORT ?= 5001
HOST ?= 127.0.0.1

.PHONY: install install-xla demo ui docs docs-gen serve serve-model test test-all test-xla zoo lock lock-xla clean

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -r requirements.lock -e .
	@# Bytecode once, now: where PYTHONDONTWRITEBYTECODE is set (as on these machines) every process would otherwise
	@# compile torch, Lightning and MLflow from source again, ~10 s of each `effnet` command's start-up.
	$(PY) -m compileall -q -j 0 -x '(_|py)312' $(VENV)/lib
	touch $@

install: $(VENV)/.installed

# The XLA (TPU) environment, beside the main one: torch_xla pins its own torch (requirements-xla.in). No compileall:
# `make test-xla` is one process, which compiles what it imports once (~7 GB of venv would take longer to compile).
VENV_XLA ?= .venv-xla
PY_XLA := $(VENV_XLA)/bin/python

$(VENV_XLA)/.installed: pyproject.toml requirements-xla.lock
	test -x $(PY_XLA) || python3 -m venv $(VENV_XLA)
	$(PY_XLA) -m pip install -q uv==$(UV_VERSION)
	$(VENV_XLA)/bin/uv pip install -q --python $(PY_XLA) --no-deps -r requirements-xla.lock -e .
	touch $@

install-xla: $(VENV_XLA)/.installed  ## the XLA (TPU) environment in .venv-xla, from requirements-xla.lock (docs: TPU)

# The run's figures beside the committed ones (HEAD) and the change: on another machine the last digits move (docs:
# Reproduce and schedule). Outside a git checkout there is nothing to compare with: the figures alone.
demo: install  ## the whole pipeline on the demo data, through the Prefect flow
	$(PY) flows/pipeline.py
	@echo "This run (workspace) beside the committed run (HEAD):"
	@dvc metrics diff --all HEAD 2>/dev/null || dvc metrics show
	@echo "Browse the runs and the registered model: make ui  (MLflow UI on http://127.0.0.1:$(UI_PORT))"

ui: install  ## MLflow UI over the workspace's store
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

docs: install  ## the documentation site on http://127.0.0.1:8000 (DOCS_PORT=...), rebuilt as pages change
	@$(PY) -c "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
	  s.bind(('127.0.0.1', $(DOCS_PORT)))" 2>/dev/null || { echo "make docs: port $(DOCS_PORT) on 127.0.0.1 is taken;" \
	  "choose another: make docs DOCS_PORT=8001" >&2; exit 2; }
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

docs-gen: install  ## rewrite the docs' generated pages and pictures from their sources (after a demo run)
	$(PY) docs/gen.py

serve: install  ## the flow as a deployment on a cron schedule (CRON=..., NAME=...); trigger: prefect deployment run 'effnet-pipeline/nightly'
	$(PY) flows/serve.py --name $(or $(NAME),nightly) --cron "$(or $(CRON),0 2 * * *)"

# `mlflow models serve --env-manager local` starts uvicorn by name: without the venv's bin on PATH (exported above)
# it exits 127. The registry is the workspace's store unless MLFLOW_TRACKING_URI names another.
serve-model: install  ## a registered model over HTTP: MODEL=models:/<name>@<alias> [PORT=5001 HOST=127.0.0.1]; POST /invocations
	@test -n "$(MODEL)" || { echo "usage: make serve-model MODEL=models:/<name>@<alias> [PORT=$(PORT)]" >&2; exit 2; }
	@test -n "$$MLFLOW_TRACKING_URI" || test -f mlflow.db || case "$(MODEL)" in models:/*|runs:/*) \
	  echo "no MLflow store here: no mlflow.db in $(CURDIR) and MLFLOW_TRACKING_URI is not set" >&2; exit 2;; esac
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  mlflow models serve -m "$(MODEL)" --env-manager local --host $(HOST) --port $(PORT)

test: install  ## the layering contracts, then the fast suite (what CI runs)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

test-all: install  ## including the `slow` tests
	$(PY) -m pytest -m ""

# torch_xla's CPU device (PJRT_DEVICE=CPU) runs the XLA path here: lazy tensors, graph compilation, Lightning's XLA
# strategy (docs: TPU). The tests pretend one TPU to Lightning; the product itself never does.
test-xla: install-xla  ## the XLA tests (marker `xla`) in .venv-xla, from requirements-xla.lock
	PATH=$(CURDIR)/$(VENV_XLA)/bin:$$PATH PJRT_DEVICE=CPU $(PY_XLA) -m pytest -m xla tests/test_xla.py

zoo: install  ## all 13 card variants through the whole DAG on tiny data (slow); prints its time and peak memory
	$(PY) -m pytest -m slow tests/test_zoo.py -s

lock:  ## re-resolve requirements.lock from pyproject.toml
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --extra docs --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o requirements.lock

# The main lock's versions for everything but torch and its CUDA libraries, which torch_xla's torch replaces.
lock-xla:  ## re-resolve requirements-xla.lock: requirements-xla.in over pyproject.toml, the rest as requirements.lock
	awk '/^[a-z0-9]/ && (!/^(torch|torchvision|triton|cuda-[a-z-]+|nvidia-[a-z0-9-]+)==/ || /^nvidia-ml-py==/)' \
	  requirements.lock > $(VENV)/main-lock-without-torch.txt
	$(VENV)/bin/uv pip compile pyproject.toml requirements-xla.in --override requirements-xla.in \
	  --constraint $(VENV)/main-lock-without-torch.txt --extra test --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_31 --custom-compile-command "make lock-xla" -o requirements-xla.lock

clean:
	rm -rf data models metrics mlflow.db mlartifacts .prefect .lightning
