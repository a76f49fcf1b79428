# densenet_fused: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: deps install test demo gpu-check

# torch first: the extension builds against the installed torch (--no-build-isolation).
deps:
	$(PIP) install -q torch torchvision
	$(PIP) install -q numpy ninja setuptools wheel tqdm matplotlib pytest pytest-benchmark timm

install: deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest tests

demo: install
	$(PYTHON) -m densenet_fused.cli demo
	$(PYTHON) -m densenet_fused.cli bench --quick --out bench_out

# On a GPU machine: build, GPU tests and benchmark, logs and JSON into OUTDIR.
gpu-check:
	bash benchmarks/gpu_check.sh $(OUTDIR)
