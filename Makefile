# Every target sets up what it needs on a fresh machine: the venv, bubblewrap, npm deps.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NPM_STAMP := tests/node_modules/.installed-stamp

.PHONY: run test demo bench typecheck sandbox-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# bubblewrap is the VM sandbox; install it from Debian when missing (needs root or sudo).
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  echo "installing bubblewrap"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq bubblewrap; }

$(NPM_STAMP): tests/package.json tests/package-lock.json
	cd tests && npm ci --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

run: $(STAMP) sandbox-deps
	$(BIN)/actorvisor run $(ARGS)

test: $(STAMP) sandbox-deps $(NPM_STAMP)
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/actorvisor demo $(ARGS)

bench: $(STAMP) sandbox-deps
	$(BIN)/python bench/conn_setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) tests/node_modules .pytest_cache .hypothesis
