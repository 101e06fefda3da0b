# django-comet: `make demo` serves the demo on http://127.0.0.1:8000/, `make test` runs
# the whole suite (installing what it needs), `make lint` checks style and types.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
APT_PACKAGES := libevent-2.1-7 chromium chromium-driver redis-server postgresql
SHELL := /bin/bash

.PHONY: demo test test-newest lint check deps system-deps bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,lint,postgres,redis]'
	touch $@

deps: $(VENV)/.installed

# The oldest supported Django (4.2 LTS) on the oldest supported Python (3.10, when the
# machine has one), in a venv of its own: `make test` runs the suite there too.
# (A pyenv shim can exist without working, so each candidate is tried.)
PYTHON_OLDEST ?= $(shell for p in python3.10 $$HOME/.pyenv/versions/3.10.*/bin/python3.10 \
  $(PYTHON); do "$$p" -c '' 2>/dev/null && { echo "$$p"; break; }; done)
VENV_OLDEST := .venv-oldest
$(VENV_OLDEST)/.installed: pyproject.toml
	test -x $(VENV_OLDEST)/bin/python || $(PYTHON_OLDEST) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_OLDEST)/bin/python -m pip install -q -e '.[test,postgres,redis]' 'Django>=4.2,<4.3'
	touch $@

# The newest Python on the machine (3.13 or 3.12, when it has one) with the newest Django
# pip gives it (6.x needs Python 3.12): `make test-newest` runs the suite there; CI runs
# it after `make test`.
PYTHON_NEWEST ?= $(shell for p in python3.13 $$HOME/.pyenv/versions/3.13.*/bin/python3.13 \
  python3.12 $$HOME/.pyenv/versions/3.12.*/bin/python3.12; do \
  "$$p" -c '' 2>/dev/null && { echo "$$p"; break; }; done)
VENV_NEWEST := .venv-newest
$(VENV_NEWEST)/.installed: pyproject.toml
	test -x $(VENV_NEWEST)/bin/python || $(PYTHON_NEWEST) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_NEWEST)/bin/python -m pip install -q -e '.[test,postgres,redis]'
	touch $@

# Debian packages the tests use, installed only when missing (needs root, as in CI).
# Elsewhere (macOS: `brew install libevent`) they are yours to install.  Debian 13 and
# Ubuntu 24.04 renamed libraries with a "t64" suffix (libevent-2.1-7t64): either counts,
# and the new name is installed where apt has it.
system-deps:
	@command -v dpkg-query >/dev/null || { echo "Not Debian: install $(APT_PACKAGES) yourself."; exit 0; }; \
	missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p $${p}t64 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  missing=$$(for p in $$missing; do apt-cache show $${p}t64 >/dev/null 2>&1 && echo $${p}t64 || echo $$p; done) && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# `make demo DEMO_ADDR=0.0.0.0:8080 DEMO_ALLOWED_HOSTS=myhost.example` to serve it elsewhere.
DEMO_ADDR ?= 127.0.0.1:8000
demo: deps
	@$(MAKE) -s system-deps APT_PACKAGES=libevent-2.1-7
	$(PY) demo_site/manage.py migrate --noinput -v0
	$(PY) demo_site/manage.py runcomet $(DEMO_ADDR)

lint: deps
	$(VENV)/bin/ruff check django_comet tests demo_site bench
	$(VENV)/bin/ruff format --check django_comet tests demo_site bench
	PYTHONPATH=demo_site $(VENV)/bin/mypy

test: deps system-deps lint $(VENV_OLDEST)/.installed
	$(VENV)/bin/pytest -p no:cacheprovider
	$(VENV_OLDEST)/bin/pytest -p no:cacheprovider

test-newest: system-deps
ifeq ($(PYTHON_NEWEST),)
	@echo "No python3.13 or python3.12 on this machine: test-newest skipped."
else
	$(MAKE) -s $(VENV_NEWEST)/.installed
	$(VENV_NEWEST)/bin/python -c 'import sys, django; print("Python", sys.version.split()[0], "Django", django.__version__)'
	$(VENV_NEWEST)/bin/pytest -p no:cacheprovider
endif

check: test

# What bench/ needs besides the tests' packages: wrk, and the headers its C peers and
# bjoern build against.  `make bench` runs bench/hello; the others are run by hand.
BENCH_APT_PACKAGES := wrk gcc libevent-dev libev-dev
bench: deps
	@$(MAKE) -s system-deps APT_PACKAGES="$(BENCH_APT_PACKAGES)"
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/hello/run.py

clean:
	rm -rf $(VENV) $(VENV_OLDEST) $(VENV_NEWEST) *.egg-info .pytest_cache .mypy_cache .ruff_cache
