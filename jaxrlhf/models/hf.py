"""Hugging Face checkpoints in and out: config.json + safetensors <-> (model, params).

Stages start from a local HF directory (GPT-2, Llama or Qwen2, as transformers writes
them) and export back to one that `transformers.AutoModelForCausalLM` loads. Names,
transposes and config keys come from the per-architecture tables in architectures.py.

A ScalarHeadModel (reward or value model) is written as its trunk plus two extra tensors,
`score.weight` [1, hidden] and `score.bias` [1], with `"jaxrlhf_score_head": true` and
`num_labels: 1` in config.json and the architecture's ...ForSequenceClassification class
in "architectures". transformers' sequence-classification classes load `score.weight`
but have no bias, so they drop `score.bias` (scores shift by that constant); an HF
sequence-classification checkpoint without `score.bias` loads here with a zero bias.
"""

import dataclasses
import json
import os
import struct
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from jaxrlhf.models import architectures
from jaxrlhf.models.architectures import CONV1D, LINEAR, SAME
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import (CausalLM, ScalarHeadModel, stack_layers,
                                        unstack_layers)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCORE_HEAD_KEY = "jaxrlhf_score_head"  # config.json flag of a ScalarHeadModel export
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Our leaf name -> HF leaf name.
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Heads outside the trunk, not prefixed: (our module, HF module, layout).
_HEAD_TENSORS = ((("lm_head",), "lm_head", LINEAR), (("score_head",), "score", LINEAR))

_INT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "intermediate_size", "max_position_embeddings")
_FLOAT_FIELDS = ("norm_eps", "rope_theta")
_BOOL_FIELDS = ("tie_word_embeddings", "qkv_bias", "out_bias", "mlp_bias")
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads")


class CheckpointError(ValueError):
  """A checkpoint directory that jaxrlhf cannot read or write; the message says why."""


# ----------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------


def _arch_for_model_type(model_type, source: str) -> str:
  for name, spec in architectures.ARCHITECTURES.items():
    if spec.hf_model_type == model_type:
      return name
  supported = ", ".join(sorted(s.hf_model_type for s in architectures.ARCHITECTURES.values()))
  raise CheckpointError(
      f"{source}: model_type {model_type!r} is not supported; supported model types: "
      f"{supported}")


def _check_type(source, key, value, field):
  if field in _INT_FIELDS:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    expected = "a positive integer"
  elif field in _FLOAT_FIELDS:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    expected = "a positive number"
  else:
    ok = isinstance(value, bool)
    expected = "true or false"
  if not ok:
    raise CheckpointError(f"{source}: field {key!r} is {value!r}; expected {expected}")


def _token_id(hf: dict, key: str, source: str):
  value = hf.get(key)
  if isinstance(value, list):  # e.g. Llama 3 lists several end tokens; the first is canonical.
    value = value[0] if value else None
  if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
    raise CheckpointError(f"{source}: field {key!r} is {value!r}; expected an integer or null")
  return value


def _rope_theta(hf: dict, spec: architectures.ArchSpec, source: str) -> float:
  # transformers v5 nests RoPE settings in "rope_parameters"; v4 used top-level keys.
  rope = hf.get("rope_parameters") or {}
  if not isinstance(rope, dict):
    raise CheckpointError(f"{source}: field 'rope_parameters' is {rope!r}; expected an object")
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise CheckpointError(
        f"{source}: RoPE type {rope_type!r} (field 'rope_parameters.rope_type' or "
        "'rope_scaling') is not supported; jaxrlhf implements only 'default'")
  theta = rope.get("rope_theta", hf.get("rope_theta", spec.hf_defaults.get("rope_theta")))
  _check_type(source, "rope_theta", theta, "rope_theta")
  return float(theta)


def config_from_hf(hf: dict, source: str = CONFIG_FILE, **overrides) -> TransformerConfig:
  """TransformerConfig from a parsed config.json; `overrides` set our own fields (dtype, ...)."""
  if not isinstance(hf, dict):
    raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
  if "model_type" not in hf:
    raise CheckpointError(f"{source}: field 'model_type' is missing")
  arch = _arch_for_model_type(hf["model_type"], source)
  spec = architectures.ARCHITECTURES[arch]
  for key, wanted in spec.hf_required.items():
    if key in hf and hf[key] != wanted:
      raise CheckpointError(
          f"{source}: field {key!r} is {hf[key]!r}; jaxrlhf supports {hf['model_type']} "
          f"only with {key}={wanted!r}")

  fields = {}
  for field, key in spec.hf_config_keys:
    value = hf.get(key, spec.hf_defaults.get(key))
    if value is None:
      if field in _REQUIRED_FIELDS:
        raise CheckpointError(f"{source}: field {key!r} is missing")
      continue  # derived in TransformerConfig (num_kv_heads, head_dim, intermediate_size)
    _check_type(source, key, value, field)
    fields[field] = float(value) if field in _FLOAT_FIELDS else value
  if spec.positions == "rope":
    fields["rope_theta"] = _rope_theta(hf, spec, source)
  if "head_dim" not in fields and fields["hidden_size"] % fields["num_heads"]:
    raise CheckpointError(
        f"{source}: hidden size {fields['hidden_size']} is not a multiple of the number of "
        f"heads {fields['num_heads']}")
  for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "pad_token_id")):
    fields[ours] = _token_id(hf, key, source)
  try:
    return TransformerConfig.for_arch(arch, **{**fields, **overrides})
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from e


def config_to_hf(config: TransformerConfig, score_head: bool = False,
                 dtype_name: str = "float32") -> dict:
  """config.json contents for `config`; raises if the architecture's format can't express it."""
  spec = config.spec
  hf: dict[str, Any] = {
      "model_type": spec.hf_model_type,
      "architectures": [spec.hf_sequence_classification_class if score_head
                        else spec.hf_causal_lm_class],
  }
  hf.update(spec.hf_required)
  for field, key in spec.hf_config_keys:
    value = getattr(config, field)
    if key in hf and hf[key] != value:
      raise CheckpointError(
          f"cannot export: {spec.hf_model_type} config.json stores several of our fields in "
          f"{key!r}, and they differ ({field}={value!r}, another is {hf[key]!r})")
    hf[key] = value
  if spec.positions == "rope":
    # v5 reads rope_parameters; the top-level copy is for transformers v4.
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    hf["rope_theta"] = config.rope_theta
  hf.update(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id, dtype=dtype_name)
  if score_head:
    hf.update({SCORE_HEAD_KEY: True, "num_labels": 1,
               "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})
  # The format may not express every config (GPT-2 has no grouped-query attention, for
  # one); reading the result back catches that here rather than in transformers.
  read_back = config_from_hf(hf, "config being exported")
  for field in dataclasses.fields(TransformerConfig):
    name = field.name
    if name in ("dtype", "param_dtype", "dropout_rate", "attention_dropout_rate", "remat",
                "logits_chunk", "scan_layers"):
      continue
    if name == "rope_theta" and spec.positions != "rope":
      continue
    if getattr(read_back, name) != getattr(config, name):
      raise CheckpointError(
          f"cannot export: {spec.hf_model_type} config.json cannot express "
          f"{name}={getattr(config, name)!r} (it would read back as "
          f"{getattr(read_back, name)!r})")
  return hf


# ----------------------------------------------------------------------------
# Tensor-name table
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Row:
  hf_name: str
  paths: tuple[str, ...]  # our "/"-joined param paths; several = fused along the output axis
  layout: str


def _tensor_rows(config: TransformerConfig, param_paths) -> list[_Row]:
  """One row per HF tensor for a params tree holding exactly `param_paths`."""
  spec = config.spec
  entries = [(tuple(f"transformer/{p}" for p in ours), spec.hf_prefix + hf_module, layout)
             for ours, hf_module, layout in spec.hf_trunk_tensors]
  entries += list(_HEAD_TENSORS)
  rows = []
  for ours, hf_module, layout in entries:
    for i in range(config.num_layers) if "{i}" in hf_module else (None,):
      modules = [p.format(i=i) for p in ours]
      for leaf, hf_leaf in _LEAF_NAMES.items():
        paths = tuple(f"{m}/{leaf}" for m in modules)
        present = [p in param_paths for p in paths]
        if all(present):
          rows.append(_Row(f"{hf_module.format(i=i)}.{hf_leaf}", paths,
                           layout if leaf == "kernel" else SAME))
        elif any(present):
          raise AssertionError(f"fused tensor {hf_module} only partly present: {paths}")
  covered = {p for row in rows for p in row.paths}
  uncovered = sorted(set(param_paths) - covered)
  if uncovered:
    raise AssertionError(f"no Hugging Face name for params {uncovered} ({config.arch} table)")
  return rows


def _flatten(params) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def _abstract_params(model) -> dict[str, jax.ShapeDtypeStruct]:
  dummy = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])
  return _flatten(shapes)


# ----------------------------------------------------------------------------
# safetensors reading
# ----------------------------------------------------------------------------


def _read_safetensors(filename: str) -> dict[str, np.ndarray]:
  try:
    return _read_safetensors_file(filename)
  except (OSError, ValueError, KeyError, struct.error, safetensors.SafetensorError) as e:
    raise CheckpointError(f"{filename}: not a readable safetensors file ({e}); a copy "
                          "cut short or damaged? Export or copy it again.") from e


def _read_safetensors_file(filename: str) -> dict[str, np.ndarray]:
  tensors = {}
  raw_bf16 = []
  with safetensors.safe_open(filename, framework="numpy") as f:
    for name in f.keys():
      # numpy has no bfloat16, so safetensors' numpy API refuses it; read those raw.
      if f.get_slice(name).get_dtype() == "BF16":
        raw_bf16.append(name)
      else:
        tensors[name] = f.get_tensor(name)
  if raw_bf16:
    with open(filename, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(header_len))
      for name in raw_bf16:
        start, end = header[name]["data_offsets"]
        f.seek(8 + header_len + start)
        data = np.frombuffer(f.read(end - start), dtype=ml_dtypes.bfloat16)
        tensors[name] = data.reshape(header[name]["shape"])
  return tensors


def _weight_files(path: str) -> list[str]:
  index_file = os.path.join(path, INDEX_FILE)
  if os.path.exists(index_file):
    try:
      with open(index_file) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index_file}: expected a JSON object with a 'weight_map' field "
                            f"({e})") from e
    names = sorted(set(weight_map.values()))
    for name in names:
      # Only safetensors shards, and only inside the directory: an index must not
      # lead the reader to a pickle or to a file elsewhere.
      if (not isinstance(name, str) or not name.endswith(".safetensors")
          or os.path.basename(name) != name):
        raise CheckpointError(f"{index_file} names shard {name!r}; expected a "
                              f".safetensors file name inside {path}")
    files = [os.path.join(path, name) for name in names]
    for filename in files:
      if not os.path.exists(filename):
        raise CheckpointError(f"{index_file} names shard {filename}, which does not exist")
    return files
  single = os.path.join(path, WEIGHTS_FILE)
  if os.path.exists(single):
    return [single]
  pickled = sorted(n for n in os.listdir(path) if n.endswith(_PICKLE_SUFFIXES))
  if pickled:
    raise CheckpointError(
        f"{path}: holds only pickled weights ({', '.join(pickled)}); jaxrlhf never unpickles "
        "checkpoints (unpickling can run arbitrary code). Convert them to safetensors first, "
        "where you trust the file: transformers.AutoModelForCausalLM.from_pretrained(dir)"
        ".save_pretrained(new_dir) writes config.json + model.safetensors.")
  raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def _read_config(path: str) -> dict:
  config_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory (expected a local Hugging Face directory)")
  if not os.path.exists(config_file):
    raise CheckpointError(f"{path}: no {CONFIG_FILE}")
  with open(config_file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{config_file}: not valid JSON (line {e.lineno}: {e.msg})") from e


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def from_pretrained(path: str, dtype=jnp.float32, param_dtype=jnp.float32, **overrides):
  """(model, params) from a local HF directory (config.json + safetensors).

  The model is a CausalLM, or a ScalarHeadModel when the directory holds a score head (our
  export, or an HF ...ForSequenceClassification checkpoint with one label). `overrides`
  set other TransformerConfig fields, e.g. dropout_rate. Params are float arrays in
  `param_dtype`, on the host (numpy), so callers shard or replicate them as they wish.
  """
  path = os.fspath(path)
  hf = _read_config(path)
  source = os.path.join(path, CONFIG_FILE)
  config = config_from_hf(hf, source, dtype=dtype, param_dtype=param_dtype, **overrides)
  architectures_field = hf.get("architectures") or []
  score_head = bool(hf.get(SCORE_HEAD_KEY)) or any(
      str(a).endswith("ForSequenceClassification") for a in architectures_field)
  # transformers' default is two labels when config.json names neither.
  num_labels = hf.get("num_labels", len(hf["id2label"]) if hf.get("id2label") else 2)
  if score_head and num_labels != 1:
    raise CheckpointError(f"{source}: a score head needs exactly one label (field 'num_labels')")
  model = ScalarHeadModel(config) if score_head else CausalLM(config)

  # The table names the layers one by one; a scanned model gets them stacked at the end.
  shapes = _abstract_params(type(model)(config.replace(scan_layers=False)))
  rows = _tensor_rows(config, shapes)
  expected = {row.hf_name: row for row in rows}
  tensors = {}
  for filename in _weight_files(path):
    tensors.update(_read_safetensors(filename))

  spec = config.spec
  for name in list(tensors):
    if name in expected:
      continue
    if spec.hf_prefix + name in expected:  # original GPT-2 checkpoints omit "transformer."
      tensors[spec.hf_prefix + name] = tensors.pop(name)
    elif name.endswith(spec.hf_ignored_suffixes):
      del tensors[name]
  if config.tie_word_embeddings and "lm_head.weight" in tensors:
    # Some tied checkpoints store the unembedding anyway; accept it if it really is tied.
    embed_name = next(r.hf_name for r in rows if r.paths == ("transformer/embed/embedding",))
    embedding = tensors.get(embed_name)
    if embedding is None or not np.array_equal(tensors["lm_head.weight"], embedding):
      raise CheckpointError(
          f"{path}: tensor 'lm_head.weight' differs from the input embedding but {source} "
          "says tie_word_embeddings=true")
    del tensors["lm_head.weight"]
  if score_head and not hf.get(SCORE_HEAD_KEY) and "score.bias" not in tensors:
    tensors["score.bias"] = np.zeros((1,), np.float32)  # transformers' score has no bias

  missing = sorted(set(expected) - set(tensors))
  extra = sorted(set(tensors) - set(expected))
  if missing:
    raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing)} "
                          f"(required by {source})")
  if extra:
    raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(extra)} for the model "
                          f"described by {source}")

  flat = {}
  for name, row in expected.items():
    array = np.asarray(tensors[name])
    if row.layout == LINEAR:
      array = array.T
    wanted = [tuple(shapes[p].shape) for p in row.paths]
    total = wanted[0][:-1] + (sum(w[-1] for w in wanted),)
    if array.shape != total:
      hf_shape = total[::-1] if row.layout == LINEAR else total
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tensors[name].shape}; "
                            f"{source} implies {hf_shape}")
    splits = np.cumsum([w[-1] for w in wanted])[:-1]
    for p, part in zip(row.paths, np.split(array, splits, axis=-1)):
      flat[p] = np.ascontiguousarray(part).astype(param_dtype)
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  if config.scan_layers:
    params = stack_layers(params, config.num_layers)
  return model, params


def save_pretrained(model, params, path: str) -> None:
  """Writes config.json and model.safetensors that transformers loads to the same logits.

  `model` is a CausalLM or ScalarHeadModel; `params` its (unreplicated) params. bfloat16
  params are written as float32 (lossless; numpy has no bfloat16).
  """
  path = os.fspath(path)
  config = model.config
  score_head = isinstance(model, ScalarHeadModel)
  params = jax.device_get(params)
  if config.scan_layers:  # the checkpoint holds the layers one by one
    if "layers" not in params.get("transformer", {}):
      raise CheckpointError("save_pretrained: the model scans its layers "
                            "(config.scan_layers) but params['transformer'] has no stacked "
                            "'layers' subtree")
    params = unstack_layers(params, config.num_layers)
    config = config.replace(scan_layers=False)
    model = type(model)(config)
  flat = _flatten(params)
  expected_shapes = _abstract_params(model)
  missing = sorted(set(expected_shapes) - set(flat))
  extra = sorted(set(flat) - set(expected_shapes))
  if missing or extra:
    raise CheckpointError(f"save_pretrained: params do not match {type(model).__name__}: "
                          f"missing {missing}, unexpected {extra}")
  for name, value in flat.items():
    if tuple(value.shape) != tuple(expected_shapes[name].shape):
      raise CheckpointError(f"save_pretrained: param {name} has shape {value.shape}, "
                            f"expected {expected_shapes[name].shape}")

  store_dtype = np.float16 if all(v.dtype == np.float16 for v in flat.values()) else np.float32
  hf = config_to_hf(config, score_head=score_head, dtype_name=np.dtype(store_dtype).name)
  tensors = {}
  for row in _tensor_rows(config, flat):
    array = np.concatenate([np.asarray(flat[p], np.float32) for p in row.paths], axis=-1)
    if row.layout == LINEAR:
      array = array.T
    tensors[row.hf_name] = np.ascontiguousarray(array.astype(store_dtype))

  os.makedirs(path, exist_ok=True)
  # transformers checks the "format" metadata before loading.
  safetensors.numpy.save_file(tensors, os.path.join(path, WEIGHTS_FILE),
                              metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
    f.write("\n")


def load_tokenizer(path: str):
  """transformers tokenizer from a local directory, with an explicit pad token.

  No hub downloads and no remote code. A tokenizer without a pad token (GPT-2's, Llama's)
  gets its eos token as pad; the log says so.
  """
  import transformers  # Heavy import (torch); only tokenizer users pay for it.

  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"load_tokenizer: {path!r} is not a local directory "
                          "(jaxrlhf never downloads from a hub)")
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      path, local_files_only=True, trust_remote_code=False)
  if tokenizer.pad_token is None:
    if tokenizer.eos_token is None:
      raise CheckpointError(f"{path}: the tokenizer has neither a pad nor an eos token; "
                            "add a pad token to its special_tokens_map.json")
    logging.warning("tokenizer %s has no pad token; using its eos token %r (id %d) as pad",
                    path, tokenizer.eos_token, tokenizer.eos_token_id)
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer
