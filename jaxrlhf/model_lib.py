"""Building models for a stage: from a config section, a Hugging Face directory, or a
previous stage's export. Shared by pretraining, SFT, the reward model and PPO.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from jaxrlhf import config_lib
from jaxrlhf import models

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  if name not in _DTYPES:
    raise config_lib.ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def transformer_config(model_cfg: ml_collections.ConfigDict, tokenizer, *,
                       dtype: str = "float32", param_dtype: str = "float32",
                       dropout_rate: float = 0.0) -> models.TransformerConfig:
  """A TransformerConfig from a config section; vocab_size 0 takes the tokenizer's."""
  fields = dict(model_cfg)
  if not fields.get("vocab_size"):
    fields["vocab_size"] = len(tokenizer)
  known = {f.name for f in dataclasses.fields(models.TransformerConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise config_lib.ConfigError(f"config.model has unknown field(s) {unknown}; known: {sorted(known)}")
  fields.update(
      dtype=dtype_from_name(dtype), param_dtype=dtype_from_name(param_dtype),
      dropout_rate=dropout_rate,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id)
  arch = fields.pop("arch")
  try:
    return models.TransformerConfig.for_arch(arch, **fields)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.model: {e}") from None


def init_params(module, seq_len: int, seed: int):
  dummy = jnp.ones((1, seq_len), jnp.int32)
  return jax.jit(module.init)(jax.random.key(seed), dummy)["params"]


def check_vocabulary(tokenizer, vocab_size: int, where: str) -> None:
  """Refuses a tokenizer whose ids reach past the model's embedding table: such an id
  reads out of bounds (NaN or garbage losses), so it is named at start-up instead."""
  size = len(tokenizer)
  if size > vocab_size:
    raise config_lib.ConfigError(
        f"{where}: the model's vocabulary has {vocab_size} entries but the tokenizer "
        f"({getattr(tokenizer, 'name_or_path', '') or 'config.tokenizer'}) has {size} "
        f"tokens, ids up to {size - 1}. Use the tokenizer the model was trained with, or "
        "a model whose vocab_size is at least the tokenizer's.")


def load_or_init(kind: str, tokenizer, *, seq_len: int, init_from: str = "",
                 model: ml_collections.ConfigDict | None = None, seed: int = 0,
                 dtype: str = "float32", param_dtype: str = "float32",
                 dropout_rate: float = 0.0, field: str = "config.init_from"):
  """Returns (module, params) for kind 'lm' or 'scalar'.

  `init_from` may name a Hugging Face directory (ours or transformers'); a causal LM's
  trunk initialises a scalar-head model, its unembedding dropped, the new head drawn from
  `seed`. Empty `init_from` builds `model` (a config's model section) from random
  weights. `field` names the config field `init_from` came from, for errors.
  """
  dropout = float(dropout_rate)
  if init_from:
    path = epath.Path(init_from)
    if not (path / "config.json").exists():
      raise FileNotFoundError(
          f"{field}={init_from!r}: no config.json there (expected a Hugging "
          "Face directory, e.g. a previous stage's <workdir>/hf).")
    lm_or_scalar, params = models.from_pretrained(
        str(path), dtype=dtype_from_name(dtype), param_dtype=dtype_from_name(param_dtype))
    # Run-time choices (remat, logits_chunk, scan_layers): the model section gives them
    # for checkpoints too.
    run_time = {name: (model or {}).get(name, default)
                for name, default in (("remat", "none"), ("logits_chunk", 0),
                                      ("scan_layers", False))}
    try:
      model_config = lm_or_scalar.config.replace(dropout_rate=dropout, **run_time)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.model: {e}") from None
    if model_config.scan_layers and not lm_or_scalar.config.scan_layers:
      params = models.stack_layers(params, model_config.num_layers)
    check_vocabulary(tokenizer, model_config.vocab_size, f"{field}={init_from!r}")
    if kind == "lm":
      if not isinstance(lm_or_scalar, models.CausalLM):
        raise config_lib.ConfigError(f"{field}={init_from!r} holds a scalar-head model; "
                         "a policy needs a causal LM.")
      return models.CausalLM(model_config), params
    module = models.ScalarHeadModel(model_config)
    fresh = init_params(module, seq_len, seed)
    if "score_head" in params:
      return module, params
    return module, {"transformer": params["transformer"], "score_head": fresh["score_head"]}
  if model is None:
    raise config_lib.ConfigError(f"{field} is empty and no model section was given to initialise.")
  model_config = transformer_config(model, tokenizer, dtype=dtype,
                                    param_dtype=param_dtype, dropout_rate=dropout)
  check_vocabulary(tokenizer, model_config.vocab_size, "config.model.vocab_size")
  module = models.CausalLM(model_config) if kind == "lm" else models.ScalarHeadModel(
      model_config)
  return module, init_params(module, seq_len, seed)


def stage_model(kind: str, config: ml_collections.ConfigDict, tokenizer, *, seq_len: int):
  """`load_or_init` with a training stage's own fields (init_from, model, seed, dtype,
  param_dtype, dropout_rate), as SFT, pretraining and the reward model name them."""
  return load_or_init(
      kind, tokenizer, seq_len=seq_len, init_from=config.get("init_from", ""),
      model=config.model, seed=config.seed, dtype=config.get("dtype", "float32"),
      param_dtype=config.get("param_dtype", "float32"),
      dropout_rate=config.get("dropout_rate", 0.0))
