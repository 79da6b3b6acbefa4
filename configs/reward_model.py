r"""Reward model on K-way rankings (InstructGPT step 2).

Embedded world (rankings sampled from the SFT policy, K = 4..9, ranked by the simulated
labeler; configs/rankings.py collects them first):
  python -m experiments.reward_model --config=configs/reward_model.py:tiny \
      --config.init_from=/tmp/run/sft/hf --config.data.rankings_dir=/tmp/run/rankings \
      --workdir=/tmp/run/rm
  Expect held-out pairwise accuracy well above chance and approaching the two
  simulated labelers' own agreement (in the rankings' summary.json), the ceiling for a
  model of one labeler.

Any rankings JSONL (K-way, chosen/rejected, or HH transcripts):
  python -m experiments.reward_model --config=configs/reward_model.py:gpt2 \
      --config.init_from=/ckpt/sft --config.tokenizer=/ckpt/sft \
      --config.data.train_file=rank.jsonl --config.data.valid_file=rank_valid.jsonl \
      --config.data.demonstrations_file=demos.jsonl --workdir=/tmp/run/rm
"""

import ml_collections

from jaxrlhf import config_lib
from jaxrlhf import optim


def get_config(arg=None):
  variant = arg or "tiny"
  config = ml_collections.ConfigDict()
  config.seed = 0  # Head init, dropout and data order.
  config.init_from = ""  # SFT (or any) Hugging Face dir; its unembedding is dropped.
  config.tokenizer = config_lib.world_tokenizer_dir()  # Local tokenizer directory.
  config.model = config_lib.model_preset("world")  # Used only when init_from is ''.
  config.dtype = "float32"  # Compute dtype.
  config.param_dtype = "float32"  # Storage dtype.
  config.dropout_rate = 0.0  # Residual dropout.

  config.data = ml_collections.ConfigDict()
  config.data.train_file = ""  # Rankings JSONL (K-way, chosen/rejected or HH)...
  config.data.valid_file = ""  # ...and held-out rankings (for pairwise accuracy).
  config.data.rankings_dir = ""  # Or the rankings stage's workdir (experiments.rankings).
  config.data.demonstrations_file = ""  # Score mean 0; required with your own rankings.
  config.data.world = config_lib.world_config()  # The world: its demonstrations where that is ''.
  config.data.world_dir = ""  # Where the world is; '' = <workdir>/world.
  config.data.k_max = 9  # Most responses a ranking may hold (the paper: 4 to 9); padding K.
  config.data.max_prompt_len = 32  # Prompt tokens kept (left-truncated).
  config.data.max_response_len = 16  # Response tokens incl. EOS (right-truncated).
  # Batches cut to multiples of this many tokens that hold their longest example
  # (a few shapes, each compiled once; data/buckets.py); 0 = the budget's shape.
  config.data.length_bucket = 8  # Rankings also drop their padded response slots.
  config.data.skip_invalid = False  # Skip and count bad lines instead of stopping.
  # Record keys renamed before parsing, "name_in_file=expected_name,...", e.g.
  # "question=prompt,better=chosen,worse=rejected" (jaxrlhf/data/formats.py).
  config.data.fields = ""
  config.data.demonstrations_fields = ""  # The same for demonstrations_file.
  config.data.shuffle_seed = 0  # Order of prompts (each with all its comparisons).

  config.normalize = ml_collections.ConfigDict()
  config.normalize.policy_samples = False  # Also scale so policy samples have std 1.
  config.normalize.max_sequences = 4096  # Sequences scored to fit the normalisation.

  config.batch_size = 32  # Prompts per global batch, each with all of its C(K,2) pairs.
  config.num_epochs = 1  # The paper: 1 epoch (more overfits).
  config.num_steps = 0  # If > 0, overrides num_epochs.
  config.optimizer = optim.default_optimizer_config()
  config.optimizer.learning_rate = 1e-4  # As SFT's (the paper: about 1e-5 for both).
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 10
  config.optimizer.final_lr_fraction = 0.1

  config.log_every = 10  # Steps between metric fetches.
  config.eval_every = 50  # Steps between held-out accuracy passes.
  config.num_eval_batches = 0  # Validation batches per pass (0 = all).
  config.checkpoint_every = 100  # Steps between checkpoints (and at the end).
  config.keep_checkpoints = 2  # Newest checkpoints kept.
  config.parallel = config_lib.parallel_config()  # pmap, or a sharded mesh.

  if variant == "tiny":
    pass
  elif variant == "test":
    config.model = config_lib.model_preset("test")
    config.data.world = config_lib.world_config(scale=0.002)
    config.data.k_max = 5
    config.normalize.max_sequences = 64
    config.batch_size = 8
    config.num_steps = 4
    config.optimizer.warmup_steps = 1
    config.log_every = 2
    config.eval_every = 2
    config.checkpoint_every = 2
  elif variant in ("gpt2", "llama"):
    config.model = config_lib.model_preset("gpt2" if variant == "gpt2" else "llama_small")
    config.data.max_prompt_len = 512
    config.data.max_response_len = 512
    config.data.length_bucket = 64
    config.batch_size = 64  # The paper: 64 prompts, i.e. up to 2304 comparisons.
    config.optimizer.learning_rate = 9e-6
    config.optimizer.warmup_steps = 10
    config.eval_every = 200
    config.checkpoint_every = 200
  elif variant == "tldr":
    # TL;DR summarisation (Huang et al. 2024; jaxrlhf/config_lib.py says where each value
    # comes from): OpenAI's summarize-from-feedback comparisons, {info, summaries,
    # choice}; demonstrations_file: the SFT data, whose reference summaries score 0 on
    # average after training (reward.py shifts by their mean score; no scaling).
    config.model = config_lib.model_preset("gpt2")
    config.tokenizer = ""
    config.data.k_max = 2  # Pairs.
    config.data.max_prompt_len = config_lib.TLDR_MAX_PROMPT_LEN
    config.data.max_response_len = config_lib.TLDR_MAX_RM_RESPONSE_LEN
    config.data.length_bucket = 0  # The reference's padded shapes.
    config.normalize.policy_samples = False
    config.dropout_rate = 0.0  # reward.py: disable_dropout.
    config.batch_size = 64  # 8 GPUs x gradient_accumulation_steps 8 x micro-batch 1.
    config.num_epochs = 1  # reward.py: num_train_epochs (total_episodes 92832, the train split).
    config.optimizer = config_lib.tldr_optimizer("cosine")
    config.log_every = 10
    config.eval_every = 200
    config.checkpoint_every = 200
  else:
    raise ValueError(f"configs/reward_model.py: unknown variant {variant!r}; "
                     "use tiny, test, gpt2, llama or tldr")
  return config
