"""Glue between the stages and jaxrlhf.data: which files a stage reads, and its loaders.

A stage's config names JSONL files; where they are empty, the embedded world is written
(once, deterministically from its seed) and its files are used instead, through the
same parsers and grain loaders as real data.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np
from etils import epath

from jaxrlhf import config_lib
from jaxrlhf import data as data_pkg
from jaxrlhf import parallel
from jaxrlhf.data import sources
from jaxrlhf.data.world import world as world_lib


# ---------------------------------------------------------------------------------------
# The embedded world.
# ---------------------------------------------------------------------------------------


def world_dir(data: ml_collections.ConfigDict, workdir) -> epath.Path:
  """Where a stage's `data` section (its `world_dir`) puts the world: '' = <workdir>/world."""
  return epath.Path(data.world_dir) if data.get("world_dir") else epath.Path(workdir) / "world"


def ensure_world(data: ml_collections.ConfigDict, workdir) -> epath.Path:
  """Writes the world described by `data.world` unless it is already there."""
  directory = world_dir(data, workdir)
  world_config = world_lib.WorldConfig.from_dict(data.world.to_dict())
  marker = directory / "world.json"
  if jax.process_index() == 0:
    existing = json.loads(marker.read_text()) if marker.exists() else None
    wanted = json.loads(json.dumps(dataclasses.asdict(world_config)))
    if existing is not None:  # a knob added since that world was written had its default
      defaults = json.loads(json.dumps(dataclasses.asdict(world_lib.WorldConfig())))
      existing["config"] = {**defaults, **existing.get("config", {})}
    if existing is None or existing.get("config") != wanted:
      if existing is not None:
        raise config_lib.ConfigError(
            f"{marker}: the world there was generated from another config "
            f"({existing.get('config')}); point config.data.world_dir elsewhere.")
      logging.info("writing the embedded world to %s", directory)
      world_lib.write_world(world_config, str(directory))
  parallel.sync_global_devices("ensure_world")
  return directory


def world_file(data: ml_collections.ConfigDict, workdir, dataset: str, split: str) -> str:
  return str(ensure_world(data, workdir) / dataset / f"{split}.jsonl")


def files_or_world(data: ml_collections.ConfigDict, workdir, dataset: str, *,
                   train: str, valid: str, train_field: str = "config.data.train_file",
                   valid_field: str = "config.data.valid_file") -> tuple[str, str]:
  """(train file, held-out file): the user's two, or, when both are empty, the embedded
  world's `dataset` files. One without the other is an error: the world's toy data never
  stands in for a file of the user's."""
  if bool(train) != bool(valid):
    given, missing = (train_field, valid_field) if train else (valid_field, train_field)
    raise config_lib.ConfigError(
        f"{given} is set but {missing} is empty: give both (held-out data of your own, "
        f"e.g. a split of your file), or neither for the embedded world's {dataset} "
        "files; the world's toy data never stands in for yours.")
  if train:
    return train, valid
  return (world_file(data, workdir, dataset, "train"),
          world_file(data, workdir, dataset, "validation"))


# ---------------------------------------------------------------------------------------
# Loaders.
# ---------------------------------------------------------------------------------------


Lengths = data_pkg.Lengths


def lengths_from_config(data: ml_collections.ConfigDict) -> data_pkg.Lengths:
  return data_pkg.Lengths(prompt=data.max_prompt_len, response=data.max_response_len,
                          text=data.get("max_seq_len", 64), k_max=data.get("k_max", 9),
                          bucket=data.get("length_bucket", 0))


TFDS_PREFIX = "tfds:"


def field_mapping(spec) -> dict[str, str]:
  """`config.data.fields`, "question=prompt,answer=response" (or a dict): record keys
  renamed before parsing, {name in the files: name the layout expects}."""
  if not spec:
    return {}
  if isinstance(spec, str):
    mapping = {}
    for item in spec.split(","):
      src, sep, dst = item.partition("=")
      if not sep or not src.strip() or not dst.strip():
        raise config_lib.ConfigError(f"config.data.fields={spec!r}: expected name_in_file=expected_name "
                         f"pairs separated by commas, got {item!r}")
      mapping[src.strip()] = dst.strip()
    spec = mapping
  return sources.check_fields(dict(spec))


def _read_prepared(kind: str, path: str, fields: dict):
  """Examples of a split that `tfds_builders.prepare` wrote: tfds:<data_dir>:<split>."""
  from jaxrlhf.data import tfds_builders  # pylint: disable=g-import-not-at-top
  data_dir, _, split = path[len(TFDS_PREFIX):].rpartition(":")
  if not data_dir or split not in tfds_builders.SPLITS:
    raise config_lib.ConfigError(f"{path!r}: a prepared dataset is named tfds:<data_dir>:<split>, "
                     f"split one of {', '.join(tfds_builders.SPLITS)}")
  if fields:
    raise config_lib.ConfigError(f"{path!r}: config.data.fields renames fields while a dataset is "
                     "prepared (tfds_builders.prepare(..., fields=...)), not when it is read")
  source = tfds_builders.load_prepared(kind, data_dir, split)
  return list(source), source.parse_stats


def read(kind: str, path: str, *, skip_invalid: bool, k_max: int | None = None,
         fields=None):
  """Parsed examples and their parse statistics; bad lines raise or are counted.

  `path` is a file, directory or glob of JSONL, Parquet or Arrow files, or a split
  prepared with `tfds_builders.prepare`, "tfds:<data_dir>:<split>". `fields` renames
  record keys (see `field_mapping`). Rankings with more responses than `k_max` (the K
  every ranking is padded to) are bad lines too, found here rather than when the loader
  reaches them.
  """
  fields = field_mapping(fields)
  if path.startswith(TFDS_PREFIX):
    examples, stats = _read_prepared(kind, path, fields)
  else:
    stats = data_pkg.DataStats()
    examples = data_pkg.read_examples(kind, path, skip_invalid=skip_invalid, stats=stats,
                                      fields=fields)
  if kind == "rankings" and k_max is not None:
    kept = []
    for example in examples:
      if example.k <= k_max:
        kept.append(example)
        continue
      error = data_pkg.DataError(
          f"{example.k} responses, more than config.data.k_max={k_max} (every ranking is "
          "padded to k_max responses): raise config.data.k_max, or set "
          "config.data.skip_invalid to leave such lines out, counted",
          source=example.source, field="responses", reason="too_many_responses")
      if not skip_invalid:
        raise error
      stats.skip(error.reason, str(error))
    examples = kept
  if stats.num_skipped:
    stats.log_summary(f"{kind} {path}")
  if not examples:
    raise config_lib.ConfigError(f"{path}: no usable {kind} examples.")
  return examples, stats


def num_train_steps(config: ml_collections.ConfigDict, num_examples: int,
                    per_example: int = 1) -> int:
  """config.num_steps, or num_epochs passes over `num_examples` in global batches."""
  if config.get("num_steps", 0):
    return int(config.num_steps)
  steps = (config.num_epochs * num_examples * per_example) // config.batch_size
  if steps < 1:
    raise config_lib.ConfigError(
        f"{num_examples} training examples make no full batch of {config.batch_size}; "
        "lower config.batch_size or set config.num_steps.")
  return int(steps)


@dataclasses.dataclass
class StageData:
  """What a stage reads: its train iterator, cached eval batches, and counters."""
  train_iter: Any
  num_train_examples: int
  seq_len: int
  eval_batches: Callable[[], list[dict]]
  sample_prompts: list[str] = dataclasses.field(default_factory=list)
  parse_stats: Any = None
  extra: dict = dataclasses.field(default_factory=dict)

  def stats(self) -> dict:
    out = dict(self.train_iter.stats.as_dict())
    return out

  def __getattr__(self, name):
    extra = self.__dict__.get("extra", {})
    if name in extra:
      return extra[name]
    raise AttributeError(name)


def _device_batches(loader, limit: int) -> list[dict]:
  """Host batches without host-only fields, up to `limit` (0 = all)."""
  out = []
  for batch in loader:
    device, _ = data_pkg.split_host_fields(batch)
    out.append(device)
    if limit and len(out) >= limit:
      break
  return out


def eval_loader_batches(kind, examples, tokenizer, lengths, per_device, limit):
  cache = []

  def batches():
    if not cache:
      loader = data_pkg.make_loader(kind, examples, tokenizer, lengths,
                                    per_device_batch_size=per_device, shuffle=False,
                                    num_epochs=1, drop_remainder=False, cut=False)
      cache.extend(data_pkg.cut_together(kind, _device_batches(loader, limit), lengths,
                                         per_device, tokenizer))
    return cache

  return batches


class DeviceIterator:
  """Drops host-only fields from a loader's batches; passes its state through."""

  def __init__(self, loader):
    self.loader = loader

  def __iter__(self):
    return self

  def __next__(self):
    device, _ = data_pkg.split_host_fields(next(self.loader))
    return device

  def get_state(self):
    return self.loader.get_state()

  def set_state(self, state):
    self.loader.set_state(state)

  @property
  def stats(self):
    return self.loader.stats


def lm_data(kind: str, tokenizer, *, train_file: str, valid_file: str,
            lengths: data_pkg.Lengths, batch_size: int, shuffle_seed: int,
            skip_invalid: bool, num_eval_batches: int = 0, fields=None) -> StageData:
  """Pretraining text (kind 'text') or demonstrations ('demonstrations'): a shuffled,
  never-ending train iterator over `train_file` and cached batches of `valid_file`."""
  per_device = parallel.check_batch_size(batch_size)
  train, parse_stats = read(kind, train_file, skip_invalid=skip_invalid, fields=fields)
  valid, _ = read(kind, valid_file, skip_invalid=skip_invalid, fields=fields)
  loader = data_pkg.make_loader(kind, train, tokenizer, lengths,
                                per_device_batch_size=per_device, seed=shuffle_seed,
                                skip_invalid=skip_invalid, parse_stats=parse_stats)
  text = kind == "text"
  prompts = [] if text else [ex.prompt for ex in valid[:8] if not ex.is_chat]
  return StageData(
      train_iter=DeviceIterator(loader), num_train_examples=len(train),
      seq_len=lengths.text if text else lengths.sequence,
      eval_batches=eval_loader_batches(kind, valid, tokenizer, lengths, per_device,
                                       num_eval_batches),
      sample_prompts=prompts, parse_stats=parse_stats)


# ---------------------------------------------------------------------------------------
# Scoring batches: single (prompt, response) sequences with the index of their EOS.
# ---------------------------------------------------------------------------------------


def score_batches(tokenizer, examples: list, lengths: data_pkg.Lengths,
                  per_device: int) -> list[dict]:
  """Host batches [local_devices, per_device, T] of prompt+response+EOS sequences, from
  demonstrations (any layout) or (prompt, response) pairs.

  `valid` marks real rows (the last batch is padded); `end_index` is the EOS, where a
  scalar-head model's score is read.
  """
  encoder = data_pkg.Encoder(tokenizer)
  examples = [ex if isinstance(ex, data_pkg.Demonstration)
              else data_pkg.Demonstration(prompt=ex[0], response=ex[1]) for ex in examples]
  n_dev = jax.local_device_count()
  chunk = n_dev * per_device
  batches = []
  for start in range(0, len(examples), chunk):
    part = examples[start:start + chunk]
    rows = [data_pkg.tokenize_demonstration(ex, encoder, lengths) for ex in part]
    ids = np.stack([r["input_ids"] for r in rows])
    mask = np.stack([r["attention_mask"] for r in rows])
    pad = chunk - len(part)
    valid = np.concatenate([np.ones(len(part), np.int32), np.zeros(pad, np.int32)])
    ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    batch = {"input_ids": ids, "attention_mask": mask,
             "end_index": (mask.sum(axis=1) - 1).astype(np.int32), "valid": valid}
    batches.append(parallel.shard(batch))
  return batches


# ---------------------------------------------------------------------------------------
# Rankings: files of the user's, or the rankings stage's (jaxrlhf/rankings.py) output.
# ---------------------------------------------------------------------------------------


def ranking_files(data: ml_collections.ConfigDict
                  ) -> tuple[list[str], list[str], list[dict] | None]:
  """(train files, held-out files, the rankings stages' summaries or None) of a
  reward-model `data` section: its `train_file` and `valid_file`, or the `rankings_dir`
  a rankings stage wrote (train.jsonl, validation.jsonl and summary.json); several
  comma-separated directories (rounds of rankings, from several policies) are read
  together."""
  if data.train_file:
    if data.get("rankings_dir"):
      raise config_lib.ConfigError("config.data.train_file and config.data.rankings_dir are both set; "
                       "give one source of rankings.")
    if not data.valid_file:
      raise config_lib.ConfigError("config.data.valid_file: held-out rankings are needed for accuracy.")
    return [data.train_file], [data.valid_file], None
  if not data.get("rankings_dir"):
    raise config_lib.ConfigError(
        "config.data.train_file is empty and so is config.data.rankings_dir: give rankings "
        "JSONL files (train_file and valid_file), or the directory that "
        "`python -m experiments.rankings` wrote (the pipeline, experiments.instructgpt, "
        "runs that stage before the reward model).")
  train, valid, summaries = [], [], []
  for name in str(data.rankings_dir).split(","):
    directory = epath.Path(name.strip())
    summary_file = directory / "summary.json"
    if not summary_file.exists():
      raise FileNotFoundError(
          f"config.data.rankings_dir={data.rankings_dir!r}: no summary.json in {directory} "
          "(the rankings stage writes it last; run or finish `python -m experiments.rankings`).")
    train.append(str(directory / "train.jsonl"))
    valid.append(str(directory / "validation.jsonl"))
    summaries.append(json.loads(summary_file.read_text()))
  return train, valid, summaries


def _read_all(kind: str, paths: list[str], **kwargs):
  """`read` of each path, one after the other: (examples, merged parse statistics)."""
  examples, stats = [], data_pkg.DataStats()
  for path in paths:
    more, more_stats = read(kind, path, **kwargs)
    examples.extend(more)
    stats.merge(more_stats)
  return examples, stats


def _mean_agreement(summaries: list[dict] | None) -> float | None:
  """Two labelers' agreement that the rankings stages measured (their mean, for rounds)."""
  values = [s["labeler_agreement"] for s in summaries or () if s.get("labeler_agreement")]
  return float(np.mean(values)) if values else None


def ranking_data(config: ml_collections.ConfigDict, tokenizer, workdir) -> StageData:
  lengths = lengths_from_config(config.data)
  per_device = parallel.check_batch_size(config.batch_size)
  skip_invalid = config.data.skip_invalid
  fields = config.data.get("fields", "")
  train_paths, valid_paths, collected = ranking_files(config.data)
  train, parse_stats = _read_all("rankings", train_paths, skip_invalid=skip_invalid,
                                 k_max=lengths.k_max, fields=fields)
  valid, _ = _read_all("rankings", valid_paths, skip_invalid=skip_invalid,
                       k_max=lengths.k_max, fields=fields)
  loader = data_pkg.make_loader("rankings", train, tokenizer, lengths,
                                per_device_batch_size=per_device,
                                seed=config.data.shuffle_seed,
                                skip_invalid=skip_invalid,
                                parse_stats=parse_stats)
  demo_path = config.data.demonstrations_file
  if not demo_path:
    if collected is None:  # rankings of the user's: the world's demonstrations are not
      raise config_lib.ConfigError(
          "config.data.demonstrations_file is empty: the reward model's scores are shifted "
          "so that labeler demonstrations score 0 on average, and with rankings of your own "
          "(config.data.train_file) the embedded world's demonstrations are not yours; set "
          "it to your SFT demonstrations.")
    demo_path = world_file(config.data, workdir, "sft", "train")
  limit = config.normalize.max_sequences

  def demonstration_batches():
    demos, _ = read("demonstrations", demo_path, skip_invalid=skip_invalid,
                    fields=config.data.get("demonstrations_fields", ""))
    return score_batches(tokenizer, demos[:limit], lengths, per_device)

  def policy_sample_batches():
    responses = [d for ex in train for d in ex.as_demonstrations()][:limit]
    return score_batches(tokenizer, responses, lengths, per_device)

  return StageData(
      train_iter=DeviceIterator(loader), num_train_examples=len(train),
      seq_len=lengths.sequence,
      eval_batches=eval_loader_batches("rankings", valid, tokenizer, lengths, per_device,
                                       config.get("num_eval_batches", 0)),
      parse_stats=parse_stats,
      extra={"labeler_agreement": _mean_agreement(collected),
             "demonstration_batches": demonstration_batches,
             "policy_sample_batches": policy_sample_batches})


# ---------------------------------------------------------------------------------------
# Prompts (PPO rollouts and evaluation).
# ---------------------------------------------------------------------------------------


def prompt_data(config: ml_collections.ConfigDict, tokenizer, workdir) -> StageData:
  """PPO prompts: a never-ending shuffled train iterator and cached held-out batches.

  Train batches keep their host-side `meta` (e.g. the world task, for evaluation);
  held-out batches carry `valid` (0 on the padding that fills the last batch).
  """
  lengths = lengths_from_config(config.data)
  per_device = parallel.check_batch_size(config.batch_size)
  train_path, valid_path = files_or_world(config.data, workdir, "ppo",
                                          train=config.data.train_file,
                                          valid=config.data.valid_file)
  fields = config.data.get("fields", "")
  train, parse_stats = read("prompts", train_path, skip_invalid=config.data.skip_invalid,
                            fields=fields)
  valid, _ = read("prompts", valid_path, skip_invalid=config.data.skip_invalid,
                  fields=fields)
  loader = data_pkg.make_loader("prompts", train, tokenizer, lengths,
                                per_device_batch_size=per_device,
                                seed=config.data.shuffle_seed,
                                skip_invalid=config.data.skip_invalid,
                                parse_stats=parse_stats)
  cache = []

  def eval_batches():
    if not cache:
      eval_loader = data_pkg.make_loader("prompts", valid, tokenizer, lengths,
                                         per_device_batch_size=per_device, shuffle=False,
                                         num_epochs=1, drop_remainder=False, cut=False)
      for batch in data_pkg.cut_together("prompts", list(eval_loader), lengths, per_device,
                                         tokenizer):
        device, host = data_pkg.split_host_fields(batch)
        device["valid"] = (np.asarray(host["index"]) >= 0).astype(np.int32)
        # Which held-out prompt each row is (-1: padding): evaluators that judge the
        # answers with the prompt's hidden task (the world's labeler) look it up.
        device["index"] = np.asarray(host["index"])
        cache.append(device)
    return cache

  return StageData(train_iter=loader, num_train_examples=len(train),
                   seq_len=lengths.prompt + lengths.response, eval_batches=eval_batches,
                   parse_stats=parse_stats,
                   extra={"eval_metas": [getattr(p, "meta", None) for p in valid]})
