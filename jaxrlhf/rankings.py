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
  if not config.policy:
    raise config_lib.ConfigError("config.policy: the rankings are sampled from a policy; set it to "
                     "the SFT export (a Hugging Face directory, e.g. <sft workdir>/hf).")
  world_config = world_lib.WorldConfig.from_dict(config.data.world.to_dict())
  labeler = world_config.labeler()
  model, params = model_lib.load_or_init("lm", tokenizer, seq_len=8,
                                         init_from=config.policy, seed=config.seed,
                                         field="config.policy")
  sampler = policy_lib.Sampler(
      model, tokenizer, max_prompt_len=config.max_prompt_len,
      max_new_tokens=config.max_response_len, temperature=config.temperature,
      per_device_batch=config.per_device_batch, devices=jax.local_devices())
  rparams = parallel.replicate(params, devices=jax.local_devices())
  info = {}
  for split in SPLITS:
    rm_file = world_dir / "rm" / f"{split}.jsonl"
    records = [json.loads(line) for line in rm_file.read_text().splitlines()]
    rng = np.random.default_rng([config.seed, 7, 0 if split == "train" else 1])
    ks = rng.integers(config.k_min, config.k_max + 1, size=len(records))
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


def collect(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The stage: writes <workdir>/{train,validation}.jsonl and summary.json; returns the
  summary. The reward model reads the directory through `config.data.rankings_dir`."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
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
    metrics_lib.console(f"rankings: {metrics_lib.format_figures(figures)}; files and "
                        f"summary in {workdir}")
  parallel.sync_global_devices("rankings")
  return json.loads(summary_file.read_text())
