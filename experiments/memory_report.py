r"""Per-device memory of each stage's step from abstract shapes: `python -m experiments.memory_report --config=configs/memory.py`."""

from benchmarks import memory
from jaxrlhf import launch

if __name__ == "__main__":
  launch.main(memory.main, needs_workdir=False)
