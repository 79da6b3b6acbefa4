"""Throughput of every stage (SFT, reward model, sampler, PPO), side by side with PyTorch.

Not part of the installed library: it measures jaxrlhf from the outside, as a user's
script would. `experiments/benchmark.py` runs it on a `configs/benchmark.py` variant.
By job:

  common.py          timing, peak memory, FLOP accounting, the matmul peak, the inputs and
                     settings both frameworks share
  jax_sections.py    jaxrlhf's compiled steps: SFT, RM, sampler, one PPO iteration
  torch_sections.py  the same work with transformers' PyTorch models
  report.py          the run over the sections, the table, the JSON; `main`
"""
