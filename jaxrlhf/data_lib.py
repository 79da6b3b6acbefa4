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

from jaxrlhf import parallel
from jaxrlhf import data as data_pkg
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.data.world import world as world_lib


# ---------------------------------------------------------------------------------------
# The embedded world.
# ---------------------------------------------------------------------------------------


def world_dir(config: ml_collections.ConfigDict, workdir) -> epath.Path:
  data = config.data
  return epath.Path(data.world_dir) if data.get("world_dir") else epath.Path(workdir) / "world"


def ensure_world(config: ml_collections.ConfigDict, workdir) -> epath.Path:
  """Writes the world described by `config.data.world` unless it is already there."""
  directory = world_dir(config, workdir)
  world_config = world_lib.WorldConfig.from_dict(config.data.world.to_dict())
  marker = directory / "world.json"
  if jax.process_index() == 0:
    existing = json.loads(marker.read_text()) if marker.exists() else None
    wanted = json.loads(json.dumps(dataclasses.asdict(world_config)))
    if existing is None or existing.get("config") != wanted:
      if existing is not None:
        raise ValueError(
            f"{marker}: the world there was generated from another config "
            f"({existing.get('config')}); point config.data.world_dir elsewhere.")
      logging.info("writing the embedded world to %s", directory)
      world_lib.write_world(world_config, str(directory))
  parallel.sync_global_devices("ensure_world")
  return directory


def world_file(config, workdir, dataset: str, split: str) -> str:
  return str(ensure_world(config, workdir) / dataset / f"{split}.jsonl")


# ---------------------------------------------------------------------------------------
# Loaders.
# ---------------------------------------------------------------------------------------


def lengths_from_config(data: ml_collections.ConfigDict) -> data_pkg.Lengths:
  return data_pkg.Lengths(prompt=data.max_prompt_len, response=data.max_response_len,
                          text=data.get("max_seq_len", 64), k_max=data.get("k_max", 9))


def read(kind: str, path: str, config: ml_collections.ConfigDict):
  """Parsed examples and their parse statistics; bad lines raise or are counted."""
  stats = data_pkg.DataStats()
  examples = data_pkg.read_examples(kind, path, skip_invalid=config.data.skip_invalid,
                                    stats=stats)
  if stats.num_skipped:
    stats.log_summary(f"{kind} {path}")
  if not examples:
    raise ValueError(f"{path}: no usable {kind} examples.")
  return examples, stats


def num_train_steps(config: ml_collections.ConfigDict, num_examples: int,
                    per_example: int = 1) -> int:
  """config.num_steps, or num_epochs passes over `num_examples` in global batches."""
  if config.get("num_steps", 0):
    return int(config.num_steps)
  steps = (config.num_epochs * num_examples * per_example) // config.batch_size
  if steps < 1:
    raise ValueError(
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
                                    num_epochs=1, drop_remainder=False)
      cache.extend(_device_batches(loader, limit))
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


def lm_data(config: ml_collections.ConfigDict, tokenizer, workdir) -> StageData:
  """Pretraining text (stage 'pretrain') or demonstrations (stage 'sft')."""
  pretrain = config.stage == "pretrain"
  kind = "text" if pretrain else "demonstrations"
  dataset = "pretrain" if pretrain else "sft"
  train_path = config.data.train_file or world_file(config, workdir, dataset, "train")
  valid_path = config.data.valid_file or world_file(config, workdir, dataset, "validation")
  lengths = lengths_from_config(config.data)
  per_device = parallel.check_batch_size(config.batch_size)
  train, parse_stats = read(kind, train_path, config)
  valid, _ = read(kind, valid_path, config)
  loader = data_pkg.make_loader(kind, train, tokenizer, lengths,
                                per_device_batch_size=per_device,
                                seed=config.data.shuffle_seed,
                                skip_invalid=config.data.skip_invalid,
                                parse_stats=parse_stats)
  prompts = [] if pretrain else [ex.prompt for ex in valid[:8] if not ex.is_chat]
  return StageData(
      train_iter=DeviceIterator(loader), num_train_examples=len(train),
      seq_len=lengths.text if pretrain else lengths.sequence,
      eval_batches=eval_loader_batches(kind, valid, tokenizer, lengths, per_device,
                                       config.get("num_eval_batches", 0)),
      sample_prompts=prompts, parse_stats=parse_stats)


# ---------------------------------------------------------------------------------------
# Scoring batches: single (prompt, response) sequences with the index of their EOS.
# ---------------------------------------------------------------------------------------


def score_batches(tokenizer, pairs: list[tuple[str, str]], lengths: data_pkg.Lengths,
                  per_device: int) -> list[dict]:
  """Host batches [local_devices, per_device, T] of prompt+response+EOS sequences.

  `valid` marks real rows (the last batch is padded); `end_index` is the EOS, where a
  scalar-head model's score is read.
  """
  encoder = data_pkg.Encoder(tokenizer)
  n_dev = jax.local_device_count()
  chunk = n_dev * per_device
  batches = []
  for start in range(0, len(pairs), chunk):
    part = pairs[start:start + chunk]
    rows = [data_pkg.tokenize_demonstration(data_pkg.Demonstration(prompt=p, response=r),
                                            encoder, lengths) for p, r in part]
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
# Rankings: from a file, or sampled from the SFT policy and ranked by the world's labeler.
# ---------------------------------------------------------------------------------------


def distinct_comparisons(meta: dict, texts: list[str], stopped: list[bool]) -> list[tuple]:
  """(meta, (a, stopped_a), (b, stopped_b)) for every pair of responses the labeler reads
  as different: the pairs two labelers can disagree on."""
  readings = [labeler_lib.reading(t, s) for t, s in zip(texts, stopped)]
  return [(meta, (texts[i], stopped[i]), (texts[j], stopped[j]))
          for i in range(len(texts)) for j in range(i + 1, len(texts))
          if readings[i] != readings[j]]


def build_world_rankings(config, tokenizer, workdir, out_dir: epath.Path) -> dict:
  """Samples K (k_min..k_max) responses per RM prompt from the policy; the labeler ranks.

  Deterministic given the seeds, so an interrupted stage rebuilds the same files.
  Returns the measured agreement of two independent labelers on the validation pairs of
  distinct responses (the labeler ties identical ones, and calibrates on distinct pairs).
  """
  from jaxrlhf import model_lib  # pylint: disable=g-import-not-at-top
  from jaxrlhf import policy_lib  # pylint: disable=g-import-not-at-top

  # Runs on process 0 alone (the caller syncs), so nothing here may be a collective:
  # the world is already written and the sampler uses this process's devices only.
  world_config = world_lib.WorldConfig.from_dict(config.data.world.to_dict())
  labeler = world_config.labeler()
  policy_dir = config.data.rankings_policy or config.init_from
  if not policy_dir:
    raise ValueError("the world's rankings are sampled from a policy: set "
                     "config.data.rankings_policy (or config.init_from) to the SFT export.")
  policy_config = ml_collections.ConfigDict(
      {"init_from": policy_dir, "seed": config.seed, "dtype": "float32",
       "param_dtype": "float32", "dropout_rate": 0.0})
  model, params = model_lib.load_or_init("lm", policy_config, tokenizer, seq_len=8)
  sampler = policy_lib.Sampler(
      model, tokenizer, max_prompt_len=config.data.max_prompt_len,
      max_new_tokens=config.data.max_response_len, temperature=config.data.temperature,
      per_device_batch=64, devices=jax.local_devices())
  rparams = parallel.replicate(params)
  info = {}
  for split in ("train", "validation"):
    rm_file = world_dir(config, workdir) / "rm" / f"{split}.jsonl"
    records = [json.loads(line) for line in rm_file.read_text().splitlines()]
    rng = np.random.default_rng([config.seed, 7, 0 if split == "train" else 1])
    ks = rng.integers(config.data.k_min, config.data.k_max + 1, size=len(records))
    flat = [r["prompt"] for r, k in zip(records, ks) for _ in range(k)]
    samples = sampler.sample(rparams, flat, jax.random.key(config.seed + 17 * len(split)))
    out, comparisons, offset, empty_responses = [], [], 0, 0
    for record, k in zip(records, ks.tolist()):
      texts = samples.texts[offset:offset + k]
      stopped = samples.stopped[offset:offset + k]
      offset += k
      # An empty response (stop token first) is no valid rankings line: counted, left out.
      keep = [i for i, t in enumerate(texts) if t]
      empty_responses += k - len(keep)
      texts, stopped = [texts[i] for i in keep], [stopped[i] for i in keep]
      k = len(texts)
      meta = world_lib.task_meta(record)
      ranks = labeler.rank(meta, texts, rng, stopped) if k >= 2 else [0] * k
      out.append(world_lib.ranking_record(record, texts, ranks))
      if split == "validation":
        comparisons.extend(distinct_comparisons(meta, texts, stopped))
    info[split] = world_lib.write_rankings(str(out_dir / f"{split}.jsonl"), out)
    info[split]["skipped/empty_response"] = int(empty_responses)
    if empty_responses:
      logging.info("%s rankings: left out %d empty responses", split, empty_responses)
    if split == "validation" and comparisons:
      info["labeler_agreement"] = labeler_lib.measure_agreement(labeler, comparisons)
  return info


def ranking_data(config: ml_collections.ConfigDict, tokenizer, workdir) -> StageData:
  lengths = lengths_from_config(config.data)
  per_device = parallel.check_batch_size(config.batch_size)
  agreement = None
  if config.data.train_file:
    train_path, valid_path = config.data.train_file, config.data.valid_file
    if not valid_path:
      raise ValueError("config.data.valid_file: held-out rankings are needed for accuracy.")
  else:
    out_dir = epath.Path(workdir) / "rankings"
    info_file = out_dir / "info.json"
    ensure_world(config, workdir)  # on every process: it syncs them
    if jax.process_index() == 0 and not info_file.exists():
      info = build_world_rankings(config, tokenizer, workdir, out_dir)
      info_file.write_text(json.dumps(info, indent=2))
    parallel.sync_global_devices("rankings")
    agreement = json.loads(info_file.read_text()).get("labeler_agreement")
    train_path, valid_path = str(out_dir / "train.jsonl"), str(out_dir / "validation.jsonl")
  train, parse_stats = read("rankings", train_path, config)
  valid, _ = read("rankings", valid_path, config)
  loader = data_pkg.make_loader("rankings", train, tokenizer, lengths,
                                per_device_batch_size=per_device,
                                seed=config.data.shuffle_seed,
                                skip_invalid=config.data.skip_invalid,
                                parse_stats=parse_stats)
  demo_path = (config.data.demonstrations_file
               or world_file(config, workdir, "sft", "train"))
  limit = config.normalize.max_sequences

  def demonstration_batches():
    demos, _ = read("demonstrations", demo_path, config)
    pairs = [(d.prompt, d.response) for d in demos if not d.is_chat][:limit]
    return score_batches(tokenizer, pairs, lengths, per_device)

  def policy_sample_batches():
    pairs = [(ex.prompt, r) for ex in train for r in ex.responses][:limit]
    return score_batches(tokenizer, pairs, lengths, per_device)

  return StageData(
      train_iter=DeviceIterator(loader), num_train_examples=len(train),
      seq_len=lengths.sequence,
      eval_batches=eval_loader_batches("rankings", valid, tokenizer, lengths, per_device,
                                       config.get("num_eval_batches", 0)),
      parse_stats=parse_stats,
      extra={"labeler_agreement": agreement,
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
  train_path = config.data.train_file or world_file(config, workdir, "ppo", "train")
  valid_path = config.data.valid_file or world_file(config, workdir, "ppo", "validation")
  train, parse_stats = read("prompts", train_path, config)
  valid, _ = read("prompts", valid_path, config)
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
                                         num_epochs=1, drop_remainder=False)
      for batch in eval_loader:
        device, host = data_pkg.split_host_fields(batch)
        device["valid"] = (np.asarray(host["index"]) >= 0).astype(np.int32)
        cache.append(device)
    return cache

  return StageData(train_iter=loader, num_train_examples=len(train),
                   seq_len=lengths.prompt + lengths.response, eval_batches=eval_batches,
                   parse_stats=parse_stats)
