# densenet_fused: `make demo` and `make test` do all the set-up on a fresh machine, in three steps
# that each say what they do: install the dependencies, build the extension, run.
#
#   make test          pinned versions (constraints.txt), or the torch already installed if it meets
#                      the lower bound (GPU machines: torch preinstalled, no network)
#   make demo          the fused block against torchvision's on this machine, then `bench --quick`
#   make test-latest   the newest versions of everything (finds the next breakage on purpose)
#   make test-min      the lowest supported set (constraints-min.txt: torch 2.11, triton 3.6, pytest 8)
#   CPU_ONLY=1         (with any target) build the extension without its CUDA sources, even where
#                      nvcc exists: minutes less on a machine without a GPU
#
# The extension is built once: a later `make test` or `make demo` skips the build while the
# installed one is newer than every source (tools/install_editable.py; `make rebuild` forces it).
# Use a virtual environment: `python3 -m venv .venv && . .venv/bin/activate` first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEPS ?= pinned
MAX_JOBS ?= 2
CPU_ONLY ?= 0
export MAX_JOBS
ifeq ($(CPU_ONLY),1)
export DENSENET_FUSED_SKIP_CUDA := 1
else ifneq ($(CPU_ONLY),0)
$(error CPU_ONLY must be 0 or 1, got '$(CPU_ONLY)')
endif

.PHONY: deps install rebuild test test-latest test-min demo dist dist-check gpu-check

deps:
	@echo "== 1/3 dependencies ($(DEPS)): tools/install_deps.py"
	$(PYTHON) tools/install_deps.py $(DEPS)

# the extension builds against the installed torch (--no-build-isolation)
install: deps
	@echo "== 2/3 the extension: tools/install_editable.py (MAX_JOBS=$(MAX_JOBS) compile jobs)"
	$(PYTHON) tools/install_editable.py

rebuild: deps
	$(PYTHON) tools/install_editable.py --force

test: install
	@echo "== 3/3 the test suite (CPU; GPU tests run where CUDA is available)"
	$(PYTHON) -m pytest tests

test-latest:
	$(MAKE) test DEPS=latest

test-min:
	$(MAKE) test DEPS=min

demo: install
	@echo "== 3/3 the demo, then bench --quick"
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
	$(PIP) install --no-deps --force-reinstall dist/densenet_fused-*.whl
	cd /tmp && $(PYTHON) $(CURDIR)/tools/smoke_test.py

# On a GPU machine: build, GPU tests and benchmark, logs and JSON into OUTDIR.
gpu-check:
	bash benchmarks/gpu_check.sh $(OUTDIR) $(or $(MODE),first)
