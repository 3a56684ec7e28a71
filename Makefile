# Quick start on a fresh machine:
#   make demo   creates .venv, builds the demo project and serves it on http://127.0.0.1:8501
#   make test   creates .venv and runs the test suite (.ci/run runs this target)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install browser lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/annotator demo

# The browser smoke test drives Debian's chromium; install it when this user can.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium is missing and cannot be installed as this user; the browser test will skip"; \
	  fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check annotator db tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
