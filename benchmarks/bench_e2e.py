"""End-to-end speed/accuracy benchmark: the same code path as the demo, with more timing repeats.

    python benchmarks/bench_e2e.py [--data banking77] [...]   # = python -m fastbert_kernels bench

Runs the unpatched model (sdpa), the patched model at each speed and the static-depth baselines
on the same batches, at batch 64 and 1; writes results.csv (with device, versions and command)
and a plot under benchmarks/results/<data set>/. Uses CUDA (event timing) when it is available.
"""

import sys

from fastbert_kernels.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
