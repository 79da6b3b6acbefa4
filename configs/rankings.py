r"""Collecting rankings for the reward model: K answers per prompt from a policy, ranked
by the embedded world's simulated labeler (the data of InstructGPT step 2).

  python -m experiments.rankings --config=configs/rankings.py:tiny \
      --config.policy=/tmp/run/sft/hf --workdir=/tmp/run/rankings
  python -m experiments.reward_model --config=configs/reward_model.py:tiny \
      --config.init_from=/tmp/run/sft/hf --config.data.rankings_dir=/tmp/run/rankings \
      --workdir=/tmp/run/reward_model
  Writes <workdir>/train.jsonl and validation.jsonl (the K-way rankings layout) and
  summary.json; expect two simulated labelers to agree on roughly 0.5 to 0.75 of the
  held-out pairs of distinct answers.
"""

import ml_collections

from jaxrlhf import config_lib


def get_config(arg=None):
  variant = arg or "tiny"
  config = ml_collections.ConfigDict()
  config.seed = 0  # K per prompt, sampling and the labeler's noise.
  config.policy = ""  # Who answers: the SFT export (a Hugging Face dir), or "name=dir,...".
  # With several, each answer comes from one of them at random; records name them.
  # Policies of config.policy ('name=dir,...') that are base models, answering after a
  # few-shot prefix of demonstrations (as the evaluation's prompted baseline).
  config.few_shot = ""
  config.few_shot_shots = 2  # Demonstrations in the prefix (as the evaluation's).
  config.few_shot_max_prompt_len = 64  # Prompt tokens with the prefix.
  config.tokenizer = config_lib.world_tokenizer_dir()  # Local tokenizer directory.
  # The share of the world's reward-model prompts ranked here (rounds split them).
  config.prompts_from = 0.0
  config.prompts_to = 1.0
  config.k_min = 4  # Answers per prompt, at least...
  config.k_max = 9  # ...and at most (the paper: 4 to 9).
  config.temperature = 1.0  # Sampling temperature.
  config.max_prompt_len = 32  # Prompt tokens kept (left-truncated).
  config.max_response_len = 16  # Answer tokens incl. EOS.
  # Batches cut to multiples of this many tokens that hold their longest example
  # (a few shapes, each compiled once; data/buckets.py); 0 = the budget's shape.
  config.length_bucket = 8  # Prompts: their left padding.
  config.per_device_batch = 64  # Answers sampled together per device.
  config.data = ml_collections.ConfigDict()
  config.data.world = config_lib.world_config()  # The embedded world, whose prompts...
  config.data.world_dir = ""  # ...are read from here; '' = <workdir>/world.
  if variant == "tiny":
    pass
  elif variant == "test":
    config.data.world = config_lib.world_config(scale=0.002)
    config.k_max = 5
  else:
    raise ValueError(f"configs/rankings.py: unknown variant {variant!r}; use tiny or test")
  return config
