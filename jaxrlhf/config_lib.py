"""Shared config sections (model shapes, checkpoint/log cadence) for configs/*.py.

Config files stay declarative: they pick a preset here and override fields.
"""

from __future__ import annotations

import importlib.resources

import ml_collections


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
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(presets)}")
  return ml_collections.ConfigDict(presets[name])


def world_config(scale: float = 0.05, seed: int = 0) -> ml_collections.ConfigDict:
  """The embedded world's knobs (see jaxrlhf.data.world.world.WorldConfig)."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = seed  # Fixes users, prompts, demonstrations and the corpus.
  cfg.scale = scale  # x the paper's 13k SFT / 33k RM / 31k PPO prompts.
  cfg.num_users = 200  # Simulated API users, split train/valid/test by user.
  cfg.pretrain_documents = 400_000  # x scale: the pretraining corpus size.
  cfg.qa_text_rate = 0.3  # Share of web statements written in the prompts' "->" form.
  cfg.demo_error_rate = 0.1  # Chance a demonstration has a slip.
  cfg.demo_filler_rate = 0.25  # Chance a demonstration ends with chatty filler.
  cfg.labeler_agreement = 0.73  # Two simulated labelers agree on this share of pairs.
  return cfg
