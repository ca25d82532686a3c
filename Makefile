# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PLUGINS := $(wildcard plugins/*/pyproject.toml)

$(STAMP): pyproject.toml constraints.txt $(PLUGINS)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt \
		-e plugins/prunespec-foobar -e plugins/prunespec-nm
	touch $(STAMP)

.PHONY: install demo test lint schema
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/prunespec apply examples/specs/every_layer_type.yaml --model examples/lenet.py:LeNet

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check prunespec tests examples benchmarks plugins
	$(BIN)/ruff format --check prunespec tests examples benchmarks plugins
	$(BIN)/mypy

schema: $(STAMP)
	$(BIN)/prunespec schema --builtins-only --out schemas/prunespec.schema.json
