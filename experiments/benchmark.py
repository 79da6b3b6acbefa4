r"""Runs the throughput benchmark: `python -m experiments.benchmark --config=configs/benchmark.py:gpt2`."""

from benchmarks import report
from jaxrlhf import launch

if __name__ == "__main__":
  launch.main(report.main, needs_workdir=False)
