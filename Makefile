# `make demo` and `make test` set everything up (scripts/setup-env: a virtual environment in
# $(VENV), torch suited to the machine, every extra, the FID weights) and run the job. The
# set-up runs again only when pyproject.toml, setup.py or the script changed.
VENV ?= .venv
PYTHON ?= python3
DEMO_OUT ?= runs/demo
STAMP := $(VENV)/.mvld-setup
BIN := $(abspath $(VENV))/bin

.PHONY: setup demo test lint typecheck
.DEFAULT_GOAL := demo

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py scripts/setup-env
	VENV="$(VENV)" PYTHON="$(PYTHON)" scripts/setup-env
	touch "$@"

# The main job: edge and receiver on loopback with simulated cameras and faults; HTML report.
demo: $(STAMP)
	PATH="$(BIN):$$PATH" mvld demo --out "$(DEMO_OUT)"

# Lint and the house format (`ruff format .` applies it).
lint: $(STAMP)
	PATH="$(BIN):$$PATH" ruff check .
	PATH="$(BIN):$$PATH" ruff format --check .

# mypy over the installed layout (mvld.common, mvld.edge, ...), pyproject.toml's [tool.mypy].
typecheck: $(STAMP)
	"$(BIN)/python" scripts/typecheck

# The whole test suite, as CI runs it: lint and type check, then exactly the README's `pytest`.
# pytest exits 5 when it collected no test: that is a failure too.
test: lint typecheck
	PATH="$(BIN):$$PATH" pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status
