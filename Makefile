# RISE-serve developer entry points. Everything installs into .venv (Python 3.12) from the
# hash-pinned requirements.lock; the stamp file makes repeated `make install` instant.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
REDIS_URL   ?= redis://127.0.0.1:6379/0
PYTEST_ARGS ?=
UV_VERSION  := 0.13.8
UV_DIR      := $(VENV)/.uv-$(UV_VERSION)

export REDIS_URL
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv install triton protos protos-check lock test demo bench clean distclean

help:
	@echo "make demo          the whole RISE loop on this machine (11-15 min on 2 cores): report in .demo/report.html"
	@echo "make test          run the tests (needs Redis at REDIS_URL=$(REDIS_URL))"
	@echo "make install       create $(VENV) (Python 3.12) and install requirements.lock + the project"
	@echo "make triton        install nvidia-pytriton and Triton's stub venv (make test does it)"
	@echo "make protos        regenerate rise/proto/v1 from protos/  (protos-check: verify they are fresh)"
	@echo "make lock          regenerate requirements.lock with uv $(UV_VERSION)"
	@echo "make bench         gRPC overhead benchmark"
	@echo "make deploy-check  lint/validate docker/, docker-compose*.yml, k8s/ offline (part of make test)"
	@echo "make clean         remove caches and build output (distclean also removes $(VENV))"

# --- environment -------------------------------------------------------------------------

# The interpreter: python3.12 on PATH, else a pyenv 3.12, else ~/.pyenv/versions/3.12*.
# Every candidate is run, so a pyenv shim without a 3.12 selected is skipped.
$(PY):
	@set -e; py=""; \
	cands="$$(command -v python3.12 2>/dev/null || true)"; \
	if command -v pyenv >/dev/null 2>&1; then \
	  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | sort -rV); do \
	    cands="$$cands $$(PYENV_VERSION=$$v pyenv which python3.12 2>/dev/null || true)"; \
	  done; \
	fi; \
	cands="$$cands $$(ls -1d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV || true)"; \
	for c in $$cands; do \
	  if "$$c" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then py="$$c"; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
	  echo "error: Python 3.12 not found (tried python3.12 on PATH, pyenv, ~/.pyenv/versions/3.12*)." >&2; \
	  echo "  Debian/Ubuntu: sudo apt-get install python3.12 python3.12-venv" >&2; \
	  echo "  or with pyenv: pyenv install 3.12.1   (the repo's .python-version selects it)" >&2; \
	  exit 1; \
	fi; \
	echo "creating $(VENV) with $$py ($$("$$py" -V 2>&1))"; \
	"$$py" -m venv $(VENV); \
	$(PY) -m pip install --quiet --upgrade pip

venv: $(PY)

# The editable install maps the top-level packages that exist when it runs, so it is redone
# when one appears (e.g. services/ or robot_agent/ gains an __init__.py).
PACKAGES := $(wildcard $(addsuffix /__init__.py,rise services robot_agent))

$(VENV)/.deps: requirements.lock | $(PY)
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || { \
	  echo "error: $(VENV) is Python $$($(PY) -c 'import platform; print(platform.python_version())'), not 3.12; run 'make distclean install'" >&2; exit 1; }
	$(PY) -m pip install --require-hashes -r requirements.lock
	@touch $@

$(STAMP): $(VENV)/.deps pyproject.toml $(PACKAGES)
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

install: $(STAMP)

TRITON_STUB := $(VENV)/triton-stub

# NVIDIA Triton through nvidia-pytriton 0.7.0 next to numpy 2: pytriton goes into $(VENV) without
# its numpy<2 pin (--no-deps; its other dependencies are pinned in the file and change no locked
# version); Triton's Python-backend stub, built for numpy 1.x, gets a small venv of its own.
$(VENV)/.triton: triton/requirements-pytriton.txt triton/requirements-stub.txt | $(STAMP)
	$(PY) -m pip install --quiet --no-deps --require-hashes -r triton/requirements-pytriton.txt
	rm -rf $(TRITON_STUB)
	$(PY) -m venv --without-pip $(TRITON_STUB)
	$(PY) -m pip --python $(TRITON_STUB)/bin/python install --quiet --no-deps --require-hashes -r triton/requirements-stub.txt
	@touch $@

triton: $(VENV)/.triton

# --- code generation / locking ------------------------------------------------------------

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

protos-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

# uv lives in its own --target dir inside the venv so it never enters the locked set.
lock: | $(PY)
	@[ -x $(UV_DIR)/bin/uv ] || $(PY) -m pip install --quiet --target $(UV_DIR) uv==$(UV_VERSION)
	$(UV_DIR)/bin/uv pip compile pyproject.toml --extra dev --extra triton --extra data --extra ml --extra agent --python-version 3.12 --generate-hashes -o requirements.lock >/dev/null
	$(UV_DIR)/bin/uv pip compile triton/requirements-pytriton.in --no-deps --python-version 3.12 --generate-hashes -o triton/requirements-pytriton.txt >/dev/null
	$(UV_DIR)/bin/uv pip compile triton/requirements-stub.in --python-version 3.12 --generate-hashes -o triton/requirements-stub.txt >/dev/null
	@echo "wrote requirements.lock"

# --- running ------------------------------------------------------------------------------

# Passed to python through the environment so it can span lines.
define REDIS_CHECK
import sys
from urllib.parse import urlparse
import redis
url = sys.argv[1]
try:
    redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
except Exception as exc:
    u = urlparse(url)
    sys.exit(
        f"make test: no Redis server answers on {url} ({type(exc).__name__}: {exc}).\n"
        f"  start one with: redis-server --daemonize yes --bind {u.hostname or '127.0.0.1'}"
        f" --port {u.port or 6379} --save '' --appendonly no\n"
        f"  not installed? sudo apt-get install redis-server  (or set REDIS_URL to a running server)"
    )
endef
export REDIS_CHECK

test: $(STAMP) $(VENV)/.triton
	@$(PY) -c "$$REDIS_CHECK" "$(REDIS_URL)"
	@$(PY) -c "import ctypes.util, sys; ctypes.util.find_library('EGL') or sys.exit('make test: MuJoCo renders through EGL, which is missing: sudo apt-get install libegl1 libgl1 libgl1-mesa-dri')"
	$(PY) -m pytest $(PYTEST_ARGS)

# Flags: make demo DEMO_ARGS="--task push --rl-steps 300 --tier small"  (see: .venv/bin/rise demo --help)
DEMO_ARGS ?=
demo: $(STAMP)
	$(VENV)/bin/rise demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) bench/grpc_overhead.py

# Offline checks of docker/, docker-compose*.yml and k8s/ (hadolint, docker-compose config,
# kubectl kustomize | kubernetes-validate); they also run in `make test`. Image build + compose
# stack on this machine: scripts/compose_smoke.sh (not in CI: 20-40 min).
.PHONY: deploy-check
deploy-check: $(STAMP)
	$(PY) -m pytest tests/test_deploy.py $(PYTEST_ARGS)

# --- housekeeping -------------------------------------------------------------------------

clean:
	rm -rf build dist .pytest_cache .demo *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
