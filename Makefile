# densenet_fused: `make demo` and `make test` do all the set-up on a fresh machine.
#
#   make test          pinned versions (constraints.txt), or the torch already installed if it meets
#                      the lower bound (GPU machines: torch preinstalled, no network)
#   make test-latest   the newest versions of everything (finds the next breakage on purpose)
#   make test-min      the lowest supported set (constraints-min.txt: torch 2.11, triton 3.6, pytest 8)
#
# Use a virtual environment: `python3 -m venv .venv && . .venv/bin/activate` first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEPS ?= pinned
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: deps install test test-latest test-min demo dist dist-check gpu-check

deps:
	$(PYTHON) tools/install_deps.py $(DEPS)

# the extension builds against the installed torch (--no-build-isolation)
install: deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest tests

test-latest:
	$(MAKE) test DEPS=latest

test-min:
	$(MAKE) test DEPS=min

demo: install
	$(PYTHON) -m densenet_fused.tools.cli demo
	$(PYTHON) -m densenet_fused.tools.cli bench --quick --out bench_out

# A release: the sdist, then a wheel built from it against the installed torch (the extension is
# ABI-bound to that torch, hence --no-build-isolation), both in dist/.
dist: deps
	rm -rf dist
	$(PYTHON) -m build --sdist --no-isolation --outdir dist .
	$(PIP) wheel --no-build-isolation --no-deps --wheel-dir dist dist/densenet_fused-*.tar.gz

# The wheel installed (not the source tree) passes the smoke test, run from outside the checkout.
dist-check: dist
	$(PIP) install -q --no-deps --force-reinstall dist/densenet_fused-*.whl
	cd /tmp && $(PYTHON) $(CURDIR)/tools/smoke_test.py

# On a GPU machine: build, GPU tests and benchmark, logs and JSON into OUTDIR.
gpu-check:
	bash benchmarks/gpu_check.sh $(OUTDIR)
