r"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Embedded world (base model from configs/pretrain.py:tiny):
  python -m experiments.sft --config=configs/sft.py:tiny \
      --config.init_from=/tmp/run/pretrain/hf --workdir=/tmp/run/sft
  Expect validation loss on demonstrations (response tokens) to fall from the base
  model's ~5 nats (it never stops after an answer) to about 0.7 in 325 steps on 2 CPU
  cores; the rest is the demonstrators' own slips and filler.

Real checkpoint (a local Hugging Face directory and a demonstrations JSONL):
  python -m experiments.sft --config=configs/sft.py:gpt2 --config.init_from=/ckpt/gpt2 \
      --config.tokenizer=/ckpt/gpt2 --config.data.train_file=demos.jsonl \
      --config.data.valid_file=demos_valid.jsonl --workdir=/tmp/run/sft
"""

import ml_collections

from jaxrlhf import config_lib
from jaxrlhf import optim


def get_config(arg=None):
  variant = arg or "tiny"
  config = ml_collections.ConfigDict()
  config.stage = "sft"  # 'sft': loss on response tokens only.
  config.seed = 0  # Parameter init, dropout and data order.
  config.init_from = ""  # Hugging Face dir to start from; '' = random `model`.
  config.tokenizer = config_lib.world_tokenizer_dir()  # Local tokenizer directory.
  config.model = config_lib.model_preset("world")  # Used only when init_from is ''.
  config.dtype = "float32"  # Compute dtype.
  config.param_dtype = "float32"  # Storage dtype of parameters.
  config.dropout_rate = 0.0  # Residual dropout (the paper: 0.2 for SFT).

  config.data = ml_collections.ConfigDict()
  config.data.train_file = ""  # Demonstrations JSONL; '' = the embedded world's.
  config.data.valid_file = ""  # Held-out demonstrations; both '' = the world's.
  config.data.world = config_lib.world_config()  # The embedded world, when files are ''.
  config.data.world_dir = ""  # Where the world is written; '' = <workdir>/world.
  config.data.max_prompt_len = 32  # Prompt tokens kept (truncated on the left).
  config.data.max_response_len = 16  # Response tokens kept incl. EOS (cut on the right).
  # Batches cut to multiples of this many tokens that hold their longest example
  # (a few shapes, each compiled once; data/buckets.py); 0 = the budget's shape.
  config.data.length_bucket = 8
  config.data.skip_invalid = False  # Skip and count bad lines instead of stopping.
  # Record keys renamed before parsing, "name_in_file=expected_name,...", e.g.
  # "question=prompt,answer=response" (jaxrlhf/data/formats.py lists the layouts).
  config.data.fields = ""
  config.data.shuffle_seed = 0  # Order of examples; part of the checkpointed state.

  config.batch_size = 32  # Global batch, sequences; must divide by the device count.
  config.num_epochs = 16  # Passes over the training set (the paper: 16).
  config.num_steps = 0  # If > 0, overrides num_epochs.
  config.optimizer = optim.default_optimizer_config()
  # Low enough to keep what the base model knows: on the world, 1e-3 leaves SFT's greedy
  # answers exactly right on 0.60 of held-out prompts, 1e-4 on 0.81.
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = "cosine"  # Warm-up, then cosine decay to 10% (the paper).
  config.optimizer.warmup_steps = 20
  config.optimizer.final_lr_fraction = 0.1
  config.optimizer.weight_decay = 0.0

  config.log_every = 20  # Steps between metric fetches (host syncs).
  config.eval_every = 100  # Steps between validation passes.
  config.num_eval_batches = 8  # Validation batches per pass (0 = the whole set).
  config.num_sample_prompts = 4  # Greedy samples of validation prompts logged as text.
  config.checkpoint_every = 200  # Steps between checkpoints (and always at the end).
  config.keep_checkpoints = 2  # Newest checkpoints kept.
  config.parallel = config_lib.parallel_config()  # pmap, or a sharded mesh.

  if variant == "tiny":
    pass
  elif variant == "test":
    config.model = config_lib.model_preset("test")
    config.data.world = config_lib.world_config(scale=0.002)
    config.batch_size = 8
    config.num_steps = 12
    config.optimizer.learning_rate = 3e-3
    config.log_every = 2
    config.eval_every = 6
    config.num_eval_batches = 1
    config.num_sample_prompts = 2
    config.checkpoint_every = 3
    config.optimizer.warmup_steps = 2
  elif variant in ("gpt2", "llama"):
    config.model = config_lib.model_preset("gpt2" if variant == "gpt2" else "llama_small")
    config.data.max_prompt_len = 512
    config.data.max_response_len = 512
    config.data.length_bucket = 64
    config.dropout_rate = 0.2
    config.batch_size = 32
    config.num_epochs = 16
    config.optimizer.learning_rate = 9.65e-6
    config.optimizer.warmup_steps = 100
    config.log_every = 10
    config.eval_every = 500
    config.checkpoint_every = 500
  elif variant == "tldr":
    # TL;DR summarisation (Huang et al. 2024; jaxrlhf/config_lib.py says where each value
    # comes from): demonstrations in the filtered TL;DR layout, {subreddit, title, post,
    # summary} (jaxrlhf/data/formats.py). The reproduction fine-tunes Pythia, a GPT-NeoX
    # model, which jaxrlhf does not implement: give a GPT-2, Llama or Qwen2 checkpoint
    # and its tokenizer (init_from, tokenizer) and both data files.
    config.model = config_lib.model_preset("gpt2")
    config.tokenizer = ""
    config.data.max_prompt_len = config_lib.TLDR_MAX_PROMPT_LEN
    config.data.max_response_len = config_lib.TLDR_MAX_SUMMARY_LEN
    config.data.length_bucket = 0  # The reference's padded shapes.
    config.dropout_rate = 0.0  # sft.py: disable_dropout.
    config.batch_size = 128  # 8 GPUs x gradient_accumulation_steps 16 x micro-batch 1.
    config.num_epochs = 1  # sft.py: num_train_epochs.
    config.optimizer = config_lib.tldr_optimizer("cosine")
    config.log_every = 10
    config.eval_every = 200
    config.checkpoint_every = 200
  else:
    raise ValueError(f"configs/sft.py: unknown variant {variant!r}; "
                     "use tiny, test, gpt2, llama or tldr")
  return config
