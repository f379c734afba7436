# Every target sets up what it needs on a fresh machine: the venv, bubblewrap, npm deps.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NPM_STAMP := tests/node_modules/.installed-stamp
# Most end-to-end tests wait on processes, sockets and VM boots: three test processes keep
# two cores busy and the suite under ten minutes.
TEST_WORKERS ?= 3

.PHONY: run test demo bench typecheck sandbox-deps ops-deps test-systemd clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The VM sandbox: bubblewrap, libseccomp (its syscall filter), e2fsprogs (each VM's disk
# image) and a C compiler (the VM's init); installed from Debian when missing (root or sudo).
sandbox-deps:
	@missing=""; \
	command -v bwrap >/dev/null 2>&1 || missing="$$missing bubblewrap"; \
	command -v cc >/dev/null 2>&1 || missing="$$missing gcc libc6-dev"; \
	command -v mkfs.ext4 >/dev/null 2>&1 || missing="$$missing e2fsprogs"; \
	ldconfig -p 2>/dev/null | grep -q 'libseccomp.so.2 ' || missing="$$missing libseccomp2"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; fi

# The operations tests drive `actorvisor top` in tmux, check the unit with systemd-analyze
# and read the listening socket's backlog with ss.
ops-deps:
	@command -v tmux >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 && \
	  command -v ss >/dev/null 2>&1 || { \
	  echo "installing tmux, systemd (for systemd-analyze) and iproute2 (for ss)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq tmux systemd iproute2; }

$(NPM_STAMP): tests/package.json tests/package-lock.json
	cd tests && npm ci --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

run: $(STAMP) sandbox-deps
	$(BIN)/actorvisor run $(ARGS)

test: $(STAMP) sandbox-deps ops-deps $(NPM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/actorvisor demo $(ARGS)

# Every benchmark in bench/, each with quick settings (each prints its figure next to the
# baseline it measured in the same run); the scripts' own defaults are the full runs.
bench: $(STAMP) sandbox-deps
	$(BIN)/python bench/conn_setup.py
	$(BIN)/python bench/relay.py --events 20000 --subscribers 1,10 --latency-events 2000 --rate 1000
	$(BIN)/python bench/sandbox.py --vms 4 --commands 100
	$(BIN)/python bench/spawn.py --actors 20 --levels 0,200
	$(BIN)/python bench/connections.py --actors 10 --per-actor 50 --rate 20 --hold 10
	$(BIN)/python bench/processes.py --mb 16 --keys 100
	$(BIN)/python bench/network.py --mb 64 --runs 1
	@for f in bench/*.py; do case $$f in bench/__init__.py|bench/conn_setup.py|bench/relay.py|bench/sandbox.py|bench/spawn.py|bench/connections.py|bench/processes.py|bench/network.py) ;; \
	  *) echo "== $$f"; $(BIN)/python $$f || exit 1;; esac; done

# Opt-in, not part of `make test`: boots a Debian tree under systemd-nspawn with the unit
# from deploy/ and serves the quickstart through it. Needs root; see deploy/README.md.
test-systemd: $(STAMP) $(NPM_STAMP)
	deploy/test-systemd.sh

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) tests/node_modules .pytest_cache .hypothesis
