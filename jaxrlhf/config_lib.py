"""Shared config sections (model shapes, checkpoint/log cadence) for configs/*.py.

Config files stay declarative: they pick a preset here and override fields.
"""

from __future__ import annotations

import importlib.resources

import ml_collections


class ConfigError(ValueError):
  """A config setting that cannot work; the message names the field. Experiment scripts
  print it as one line (jaxrlhf/launch.py), the traceback going to the run's log."""


def world_tokenizer_dir() -> str:
  """The embedded world's tokenizer, shipped inside the package."""
  return str(importlib.resources.files("jaxrlhf") / "assets" / "world_tokenizer")


def model_preset(name: str) -> ml_collections.ConfigDict:
  """Model shapes by name; vocab_size 0 means "take it from the tokenizer"."""
  presets = {
      # The embedded world's base model: small enough to train in minutes on 2 CPUs.
      "world": dict(arch="llama", vocab_size=0, hidden_size=128, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384,
                    max_position_embeddings=128, tie_word_embeddings=True),
      # A reward-model trunk about 3x the base model's compute (the paper's 6B reward
      # model served 1.3B policies): configs/instructgpt.py:paper.
      "world_rm": dict(arch="llama", vocab_size=0, hidden_size=192, num_layers=4,
                       num_heads=6, num_kv_heads=3, head_dim=32, intermediate_size=576,
                       max_position_embeddings=128, tie_word_embeddings=True),
      # For CI-sized end-to-end tests.
      "test": dict(arch="llama", vocab_size=0, hidden_size=32, num_layers=1,
                   num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                   max_position_embeddings=128, tie_word_embeddings=True),
      # GPT-2 small (124M).
      "gpt2": dict(arch="gpt2", vocab_size=50257, hidden_size=768, num_layers=12,
                   num_heads=12, num_kv_heads=12, head_dim=64, intermediate_size=3072,
                   max_position_embeddings=1024, tie_word_embeddings=True),
      # A Llama-shaped model of about GPT-2 small's size.
      "llama_small": dict(arch="llama", vocab_size=32000, hidden_size=768, num_layers=12,
                          num_heads=12, num_kv_heads=4, head_dim=64,
                          intermediate_size=2048, max_position_embeddings=2048,
                          tie_word_embeddings=False),
  }
  if name not in presets:
    raise ConfigError(f"unknown model preset {name!r}; known: {sorted(presets)}")
  cfg = ml_collections.ConfigDict(presets[name])
  # Rematerialisation in the backward pass: 'none', 'full' or 'dots' (keep the weight
  # matmuls' outputs). A run-time choice: it applies to a loaded init_from checkpoint too.
  cfg.remat = "none"
  # Positions per chunk when log-probabilities are taken without the full [batch, T,
  # vocab] logits (for large vocabularies); 0 = the full logits. Run-time, like remat.
  cfg.logits_chunk = 0
  # The decoder layers as one scanned layer (params stacked on a layer axis): compile
  # time independent of depth, and under fsdp one layer's weights gathered at a time.
  # Run-time, like remat: Hugging Face exports hold the layers one by one.
  cfg.scan_layers = False
  return cfg


def world_config(scale: float = 0.05, seed: int = 0) -> ml_collections.ConfigDict:
  """The embedded world's knobs (see jaxrlhf.data.world.world.WorldConfig)."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = seed  # Fixes users, prompts, demonstrations and the corpus.
  cfg.scale = scale  # x the paper's 13k SFT / 33k RM / 31k PPO prompts.
  cfg.rm_scale = 1.0  # x scale again for the RM prompts alone (more ranked prompts).
  cfg.num_users = 200  # Simulated API users, split train/valid/test by user.
  cfg.pretrain_documents = 400_000  # x scale: the pretraining corpus size.
  cfg.qa_text_rate = 0.3  # Share of web statements written in the prompts' "->" form.
  cfg.demo_error_rate = 0.1  # Chance a demonstration has a slip.
  cfg.demo_filler_rate = 0.25  # Chance a demonstration ends with chatty filler.
  cfg.labeler_agreement = 0.73  # Two simulated labelers agree on this share of pairs.
  return cfg


# The TL;DR summarisation reproduction of Huang et al. (2024), "The N+ Implementation
# Details of RLHF with PPO: A Case Study on TL;DR Summarization", as released in
# github.com/vwxyzjn/summarize_from_feedback_details (summarize_from_feedback_details/
# sft.py, reward.py, ppo.py and tldr_dataset.py). The `:tldr` presets of configs/sft.py,
# reward_model.py and ppo.py take their settings from there.
TLDR_MAX_PROMPT_LEN = 512  # tldr_dataset.py: length=512, the post cut to fit.
TLDR_MAX_SUMMARY_LEN = 53  # tldr_dataset.py max_sft_response_length; ppo.py response_length.
TLDR_MAX_RM_RESPONSE_LEN = 169  # tldr_dataset.py max_rm_response_length.


def parallel_config() -> ml_collections.ConfigDict:
  """How a stage uses its devices (jaxrlhf/parallel.py)."""
  cfg = ml_collections.ConfigDict()
  # 'pmap': every device holds the whole state, batches split over the devices.
  # 'mesh': jit over a device mesh; parameters, optimizer states, EMA, reference and
  # reward model split over its fsdp and tensor axes, batches over data and fsdp.
  cfg.mode = "pmap"
  # Mesh mode: axis sizes, e.g. "fsdp=8", "data=2,fsdp=4" or "fsdp=4,tensor=2"; one may
  # be -1 (the rest of the devices); '' = fsdp over every device. A tensor group (the
  # devices splitting one model copy's heads and MLP) lies within one process.
  cfg.mesh = ""
  return cfg


def tldr_optimizer(schedule: str) -> ml_collections.ConfigDict:
  """The reproduction's optimizer for all three stages: torch AdamW at lr 3e-6 and eps
  1e-5 (sft.py, reward.py, ppo.py), with torch's defaults for what they leave unset
  (betas 0.9 and 0.999, weight decay 0.01 on every parameter), no warm-up and no
  gradient clipping; the learning rate decays to 0 (`schedule`: cosine for SFT and
  the reward model, linear for PPO)."""
  from jaxrlhf import optim  # pylint: disable=g-import-not-at-top
  cfg = optim.default_optimizer_config()
  cfg.name = "adamw"
  cfg.learning_rate = 3e-6
  cfg.eps = 1e-5
  cfg.b1, cfg.b2 = 0.9, 0.999
  cfg.weight_decay = 0.01
  cfg.decay_matrices_only = False
  cfg.schedule = schedule
  cfg.warmup_steps = 0
  cfg.final_lr_fraction = 0.0
  cfg.grad_clip_norm = 0.0
  return cfg
