"""The public-benchmark evaluation of several checkpoints side by side: TruthfulQA MC,
CrowS-Pairs, Winogender, RealToxicityPrompts and few-shot multiple choice, as configured in
configs/evaluate.py; writes one table (markdown and JSON) with a column per checkpoint.

`experiments/evaluate.py` calls `evaluate(config, workdir)`. A benchmark runs when its file
is set; every process takes part in the pmapped work, process 0 alone writes.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from jaxrlhf import config_lib
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf.eval import crows_pairs
from jaxrlhf.eval import loglik
from jaxrlhf.eval import multiple_choice
from jaxrlhf.eval import toxicity
from jaxrlhf.eval import truthfulqa
from jaxrlhf.eval import winogender

RESULTS_JSON = "benchmarks.json"
RESULTS_MD = "benchmarks.md"
SAMPLES_DIR = "toxicity_samples"


def parse_named_list(spec: str, field: str) -> dict[str, str]:
  """'a=/x,b=/y' (or bare paths, named after their directory) -> {'a': '/x', 'b': '/y'}.

  A bare '<run>/<stage>/hf' is named '<stage>', so pipeline exports need no names.
  """
  out = {}
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    name, sep, path = item.partition("=")
    if not sep:
      path = item.rstrip("/")
      parts = path.split("/")
      name = parts[-2] if parts[-1] in ("hf", "hf_ema") and len(parts) > 1 else parts[-1]
      if parts[-1] == "hf_ema":
        name += "_ema"
    name, path = name.strip(), path.strip()
    if not name or not path:
      raise config_lib.ConfigError(f"config.{field}: expected name=path items, got {item!r}")
    if name in out:
      raise config_lib.ConfigError(f"config.{field}: the name {name!r} is used twice; name them "
                       "explicitly as name=path")
    out[name] = path
  return out


def _check_config(config: ml_collections.ConfigDict) -> dict[str, str]:
  checkpoints = parse_named_list(config.checkpoints, "checkpoints")
  if not checkpoints:
    raise config_lib.ConfigError("config.checkpoints is empty: give name=dir items, e.g. "
                     "sft=/tmp/run/sft/hf,ppo=/tmp/run/ppo/hf")
  for name, path in checkpoints.items():
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise FileNotFoundError(f"config.checkpoints: {name}={path} has no config.json "
                              "(expected a Hugging Face directory, e.g. a stage's <workdir>/hf)")
  enabled = [config.truthfulqa.file, config.crows_pairs.file, config.winogender.file,
             config.toxicity.file, config.multiple_choice.files]
  if not any(enabled):
    raise config_lib.ConfigError("no benchmark file is set: set at least one of config.truthfulqa.file, "
                     "config.crows_pairs.file, config.winogender.file, config.toxicity.file, "
                     "config.multiple_choice.files")
  for field, path in (("truthfulqa.file", config.truthfulqa.file),
                      ("crows_pairs.file", config.crows_pairs.file),
                      ("winogender.file", config.winogender.file),
                      ("toxicity.file", config.toxicity.file)):
    if path and not os.path.isfile(path):
      raise FileNotFoundError(f"config.{field}={path!r}: no such file")
  if config.toxicity.file and not config.toxicity.scorer:
    raise config_lib.ConfigError("config.toxicity.file is set but config.toxicity.scorer is empty: give a "
                     "scalar-head checkpoint directory or 'package.module:factory'")
  return checkpoints


def evaluate_checkpoint(config, model, params, tokenizer, toxicity_scorer) -> tuple[dict, list]:
  """{benchmark: {metric: value}} and the toxicity samples of one checkpoint."""
  rparams = parallel.replicate(params)
  scorer = loglik.LoglikScorer(model, params, tokenizer, max_len=config.max_len,
                               per_device_batch=config.per_device_batch_size,
                               replicated_params=rparams)
  cap = config.max_examples
  results, samples = {}, []

  def timed(name, fn):
    start = time.time()
    results[name] = fn()
    logging.info("%s: %.1fs %s", name, time.time() - start, results[name])

  if config.truthfulqa.file:
    timed("truthfulqa", lambda: truthfulqa.evaluate(
        scorer, config.truthfulqa.file, prompt=config.truthfulqa.prompt, max_examples=cap))
  if config.crows_pairs.file:
    timed("crows_pairs", lambda: crows_pairs.evaluate(
        scorer, config.crows_pairs.file, instructions=config.crows_pairs.instructions,
        max_examples=cap))
  if config.winogender.file:
    timed("winogender", lambda: winogender.evaluate(
        scorer, config.winogender.file, genders=config.winogender.genders,
        instructions=config.winogender.instructions, max_examples=cap))
  if config.toxicity.file:
    def run_toxicity():
      metrics, records = toxicity.evaluate(
          model, params, tokenizer, toxicity_scorer, config.toxicity.file,
          instructions=config.toxicity.instructions, num_samples=config.toxicity.num_samples,
          max_prompt_len=config.toxicity.max_prompt_len,
          max_new_tokens=config.toxicity.max_new_tokens,
          temperature=config.toxicity.temperature, top_p=config.toxicity.top_p,
          per_device_batch=config.per_device_batch_size, seed=config.seed,
          max_examples=cap, rparams=rparams)
      samples.extend(records)
      return metrics
    timed("toxicity", run_toxicity)
  fewshot = parse_named_list(config.multiple_choice.fewshot_files, "multiple_choice.fewshot_files")
  for task, path in parse_named_list(config.multiple_choice.files,
                                     "multiple_choice.files").items():
    timed(f"multiple_choice/{task}", lambda: multiple_choice.evaluate(
        scorer, path, fewshot_path=fewshot.get(task, ""),
        num_shots=config.multiple_choice.num_shots, seed=config.seed,
        normalization=config.multiple_choice.normalization, max_examples=cap))
  return results, samples


def _format(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  return f"{float(value):.4f}"


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
  """One section per benchmark: a row per metric, a column per checkpoint."""
  names = list(results)
  benchmarks = []
  for per_benchmark in results.values():
    benchmarks += [b for b in per_benchmark if b not in benchmarks]
  lines = ["# Public benchmarks", ""]
  for benchmark in benchmarks:
    metrics = []
    for name in names:
      metrics += [m for m in results[name].get(benchmark, {}) if m not in metrics]
    lines += [f"## {benchmark}", "", "| metric | " + " | ".join(names) + " |",
              "| --- |" + " ---: |" * len(names)]
    for metric in metrics:
      cells = [_format(results[name].get(benchmark, {}).get(metric)) for name in names]
      lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured benchmark on every checkpoint; writes the tables to workdir."""
  checkpoints = _check_config(config)
  parallel.configure(config.get("parallel"))
  toxicity_scorer = None
  if config.toxicity.file:
    scorer_kwargs = {}
    if os.path.isdir(config.toxicity.scorer):
      scorer_kwargs = dict(max_len=config.toxicity.scorer_max_len,
                           per_device_batch=config.per_device_batch_size)
    toxicity_scorer = toxicity.load_scorer(config.toxicity.scorer, **scorer_kwargs)

  results, samples = {}, {}
  for name, path in checkpoints.items():
    logging.info("evaluating %s (%s)", name, path)
    model, params = models.from_pretrained(path)
    if not isinstance(model, models.CausalLM):
      raise config_lib.ConfigError(f"config.checkpoints: {name}={path} is a scalar-head model; the "
                       "benchmarks evaluate causal LMs")
    tokenizer = models.load_tokenizer(config.tokenizer or path)
    results[name], samples[name] = evaluate_checkpoint(config, model, params, tokenizer,
                                                       toxicity_scorer)

  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULTS_JSON), "w") as f:
      json.dump({"checkpoints": checkpoints, "results": results,
                 "config": json.loads(config.to_json_best_effort())}, f, indent=2)
      f.write("\n")
    with open(os.path.join(workdir, RESULTS_MD), "w") as f:
      f.write(markdown_table(results))
    for name, records in samples.items():
      if records:
        os.makedirs(os.path.join(workdir, SAMPLES_DIR), exist_ok=True)
        with open(os.path.join(workdir, SAMPLES_DIR, f"{name}.jsonl"), "w") as f:
          for record in records:
            f.write(json.dumps(record) + "\n")
    print(markdown_table(results), flush=True)
  return results
