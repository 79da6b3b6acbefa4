r"""Runs the rankings stage: `python -m experiments.rankings --config=configs/rankings.py:tiny --config.policy=SFT_HF_DIR --workdir=DIR`."""

from jaxrlhf import launch
from jaxrlhf import rankings

if __name__ == "__main__":
  launch.main(rankings.collect)
