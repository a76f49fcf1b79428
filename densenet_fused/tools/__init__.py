"""The tools built on the runtime: the ``densenet-fused`` command line (cli), the benchmark (bench),
the GPU cost counted without a GPU (cost), training (train) and the demo.  Nothing in the runtime
imports this package."""
