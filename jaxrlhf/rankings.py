"""Collecting rankings (the data of InstructGPT step 2): K answers per prompt, ranked.

For each of the embedded world's reward-model prompts the policy (the SFT export) samples
K answers, K drawn from `k_min..k_max` per prompt as the paper's labelers saw 4 to 9; the
world's simulated labeler ranks them. The stage writes, in its workdir, `train.jsonl` and
`validation.jsonl` in the K-way rankings layout the reward model reads (the same layout
as a user's own rankings files), and `summary.json` with what was written, what was left
out (all-tied rankings, empty answers) and how often two independent labelers agree on
the held-out pairs of distinct answers: the ceiling of a model of one labeler.

Deterministic given the seeds, so an interrupted stage writes the same files again.
Sampling runs on process 0 alone; the other processes wait for it.
"""

from __future__ import annotations

import json
import time

from absl import logging
import jax
import ml_collections
import numpy as np
from etils import epath

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import config_lib
from jaxrlhf import data_lib
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import model_lib
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import policy_lib
from jaxrlhf.data import formats
from jaxrlhf.eval import policy_inputs
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.data.world import world as world_lib

SPLITS = ("train", "validation")


def distinct_comparisons(meta: dict, texts: list[str], stopped: list[bool]) -> list[tuple]:
  """(meta, (a, stopped_a), (b, stopped_b)) for every pair of responses the labeler reads
  as different: the pairs two labelers can disagree on."""
  readings = [labeler_lib.reading(t, s) for t, s in zip(texts, stopped)]
  return [(meta, (texts[i], stopped[i]), (texts[j], stopped[j]))
          for i in range(len(texts)) for j in range(i + 1, len(texts))
          if readings[i] != readings[j]]


def sample_and_rank(config: ml_collections.ConfigDict, tokenizer, world_dir: epath.Path,
                    out_dir: epath.Path) -> dict:
  """Samples K answers per prompt of `world_dir`/rm from `config.policy`; the labeler
  ranks them; writes `out_dir`/{train,validation}.jsonl. Returns the counts and the
  measured agreement of two labelers on the validation pairs of distinct answers (the
  labeler ties identical ones, and calibrates on distinct pairs).

  Runs on one process, so nothing here may be a collective: the sampler uses this
  process's devices only.
  """
  world_config = world_lib.WorldConfig.from_dict(config.data.world.to_dict())
  labeler = world_config.labeler()
  policies = []  # (name, sampler, replicated params, few-shot prefix or None)
  for name, path in mix(config).items():
    model, params = model_lib.load_or_init("lm", tokenizer, seq_len=8, init_from=path,
                                           seed=config.seed, field="config.policy")
    few_shot = name in _names(config.get("few_shot", ""))
    prefix = None
    if few_shot:
      prefix = policy_inputs.few_shot_prefix(
          formats.read_examples("demonstrations", str(world_dir / "sft" / "train.jsonl")),
          config.few_shot_shots, tokenizer.eos_token, config.seed)
    sampler = policy_lib.Sampler(
        model, tokenizer,
        max_prompt_len=config.few_shot_max_prompt_len if few_shot else config.max_prompt_len,
        max_new_tokens=config.max_response_len, temperature=config.temperature,
        per_device_batch=config.per_device_batch, devices=jax.local_devices(),
        length_bucket=config.get("length_bucket", 0))
    policies.append((name, sampler, parallel.replicate(params, devices=jax.local_devices()),
                     prefix))
  info = {}
  for split in SPLITS:
    rm_file = world_dir / "rm" / f"{split}.jsonl"
    records = [json.loads(line) for line in rm_file.read_text().splitlines()]
    share = (config.get("prompts_from", 0.0), config.get("prompts_to", 1.0))
    records = records[round(share[0] * len(records)):round(share[1] * len(records))]
    rng = np.random.default_rng([config.seed, 7, 0 if split == "train" else 1])
    ks = rng.integers(config.k_min, config.k_max + 1, size=len(records))
    flat = [r["prompt"] for r, k in zip(records, ks) for _ in range(k)]
    # Which policy writes each answer: one at random per answer, on a stream of its own.
    who = np.random.default_rng([config.seed, 8, 0 if split == "train" else 1]).integers(
        len(policies), size=len(flat)) if len(policies) > 1 else np.zeros(len(flat), int)
    texts_all, stopped_all = [None] * len(flat), [None] * len(flat)
    for p, (name, sampler, rparams, prefix) in enumerate(policies):
      mine = np.nonzero(who == p)[0]
      if not mine.size:
        continue
      prompts = [flat[i] if prefix is None else f"{prefix} {flat[i]}" for i in mine]
      key = jax.random.key(config.seed + 17 * len(split))
      samples = sampler.sample(rparams, prompts, key if p == 0 else jax.random.fold_in(key, p))
      for j, i in enumerate(mine):
        texts_all[i], stopped_all[i] = samples.texts[j], samples.stopped[j]
    names = [policies[p][0] for p in who]
    out, comparisons, offset, empty_responses = [], [], 0, 0
    for record, k in zip(records, ks.tolist()):
      texts = texts_all[offset:offset + k]
      stopped = stopped_all[offset:offset + k]
      authors = names[offset:offset + k]
      offset += k
      # An empty response (stop token first) is no valid rankings line: counted, left out.
      keep = [i for i, t in enumerate(texts) if t]
      empty_responses += k - len(keep)
      texts, stopped = [texts[i] for i in keep], [stopped[i] for i in keep]
      authors = [authors[i] for i in keep]
      k = len(texts)
      meta = world_lib.task_meta(record)
      ranks = labeler.rank(meta, texts, rng, stopped) if k >= 2 else [0] * k
      ranking = world_lib.ranking_record(record, texts, ranks)
      if ranking is not None and len(policies) > 1:
        ranking["policies"] = authors  # who wrote each response
      out.append(ranking)
      if split == "validation":
        comparisons.extend(distinct_comparisons(meta, texts, stopped))
    info[split] = world_lib.write_rankings(str(out_dir / f"{split}.jsonl"), out)
    info[split]["skipped/empty_response"] = int(empty_responses)
    if empty_responses:
      logging.info("%s rankings: left out %d empty responses", split, empty_responses)
    if split == "validation" and comparisons:
      info["labeler_agreement"] = labeler_lib.measure_agreement(labeler, comparisons)
  return info


def _names(spec: str) -> list[str]:
  return [part.strip() for part in str(spec or "").split(",") if part.strip()]


def mix(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{name: Hugging Face dir} of the policies that answer: `config.policy` alone (named
  'policy'), or the 'name=path,...' list in it, each answer written by one of them
  drawn at random (the paper's labelers ranked outputs of several models)."""
  if not config.policy:
    raise config_lib.ConfigError(
        "config.policy: the rankings are sampled from a policy; set it to the SFT export "
        "(a Hugging Face directory, e.g. <sft workdir>/hf), or to 'name=dir,name=dir' for "
        "a mix of policies.")
  if "=" not in config.policy:
    out = {"policy": config.policy}
  else:
    out = {}
    for item in _names(config.policy):
      name, sep, path = (x.strip() for x in item.partition("="))
      if not sep or not name or not path or name in out:
        raise config_lib.ConfigError(
            f"config.policy={config.policy!r}: {item!r} is not a new name=dir")
      out[name] = path
  unknown = set(_names(config.get("few_shot", ""))) - set(out)
  if unknown:
    raise config_lib.ConfigError(
        f"config.few_shot={config.few_shot!r}: {sorted(unknown)} name no policy of "
        f"config.policy (names: {sorted(out)})")
  return out


def collect(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The stage: writes <workdir>/{train,validation}.jsonl and summary.json; returns the
  summary. The reward model reads the directory through `config.data.rankings_dir`."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if not 0.0 <= config.get("prompts_from", 0.0) < config.get("prompts_to", 1.0) <= 1.0:
    raise config_lib.ConfigError(
        f"config.prompts_from={config.prompts_from}, config.prompts_to={config.prompts_to}: "
        "the share of the prompts this stage ranks must satisfy 0 <= from < to <= 1.")
  if not (config.k_min >= 2 and config.k_max >= config.k_min):
    raise config_lib.ConfigError(f"config.k_min={config.k_min}, config.k_max={config.k_max}: a ranking "
                     "needs at least 2 answers and k_max >= k_min.")
  tokenizer = models.load_tokenizer(config.tokenizer)
  world_dir = data_lib.ensure_world(config.data, workdir)  # on every process: it syncs
  t0 = time.time()
  summary_file = workdir / "summary.json"
  if jax.process_index() == 0:
    info = sample_and_rank(config, tokenizer, world_dir, workdir)
    summary = {"stage": "rankings", "policy": config.policy,
               "k_min": int(config.k_min), "k_max": int(config.k_max), **info,
               "seconds": time.time() - t0}
    checkpoint_lib.save_json(summary_file, summary)
    figures = {"train rankings": info["train"]["written"],
               "validation rankings": info["validation"]["written"],
               "labeler agreement": info.get("labeler_agreement")}
    metrics_lib.console(f"{config.get('name') or 'rankings'}: "
                        f"{metrics_lib.format_figures(figures)}; files and "
                        f"summary in {workdir}")
  parallel.sync_global_devices("rankings")
  return json.loads(summary_file.read_text())
