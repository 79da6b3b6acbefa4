"""Policies judged against a baseline on held-out prompts: the paper's headline evaluation.

Every policy answers the same prompts (the embedded world's test prompts come from users
no training set saw). A judge compares each answer with the baseline policy's answer to
the same prompt: the world's simulated labeler, or, for real data where no labeler
exists, a reward model. Ties count half; the 95% interval is the normal interval of the
mean over prompts. Next to the win rate, per policy: the labeler's Likert rating and
exact correctness per instruction type, KL from the reference policy on the policy's
own samples, NLL on held-out pretraining text (the alignment tax) and the mean
reward-model score. A base model can take part prompted few-shot (the paper's
"GPT-3 prompted" baseline). `evaluate_policies` is the entry point; `jaxrlhf.eval.report`
turns its results into report.md and plots.

This module is the stage only; its parts live beside it: `policy_inputs` (policies,
prompts, few-shot prefix, held-out text), `generation` (the pmapped sampling and scoring
programs), `policy_runs` (one policy's answers and measurements) and `judging` (win
rates, the labeler's verdicts, best-of-n, the reward-model check).
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from etils import epath

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import config_lib
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import policy_lib
from jaxrlhf import summaries as summaries_lib
from jaxrlhf.data import formats
from jaxrlhf.data import tokenize as tokenize_lib
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.data.world import world as world_lib
from jaxrlhf.eval import generation as generation_lib
from jaxrlhf.eval import judging
from jaxrlhf.eval import policy_inputs
from jaxrlhf.eval import policy_runs



def _prompt_record(prompt: formats.Prompt):
  """A prompt as its file held it: text, or the chat's messages."""
  if prompt.is_chat:
    return [{"role": role, "content": content} for role, content in prompt.messages]
  return prompt.prompt

def _world_labeler(config: ml_collections.ConfigDict) -> labeler_lib.Labeler:
  """The labeler the world was written with (its calibrated noise is in world.json)."""
  marker = epath.Path(config.world_dir) / "world.json"
  if marker.exists():
    scale = json.loads(marker.read_text()).get("labeler_noise_scale")
    if scale is not None:
      return labeler_lib.Labeler(float(scale))
  return world_lib.WorldConfig.from_dict(config.world.to_dict()).labeler()


def check_config(config: ml_collections.ConfigDict) -> dict[str, str]:
  policies = policy_inputs.parse_policies(config.policies)
  names = list(policies) + ([config.few_shot.name] if config.few_shot.base else [])
  if config.few_shot.base and config.few_shot.name in policies:
    raise config_lib.ConfigError(f"config.few_shot.name={config.few_shot.name!r} is also in "
                     "config.policies")
  if config.baseline not in policies:
    raise config_lib.ConfigError(f"config.baseline={config.baseline!r} is not one of config.policies "
                     f"({list(policies)})")
  if config.reference and config.reference not in policies:
    raise config_lib.ConfigError(f"config.reference={config.reference!r} is not one of "
                     f"config.policies ({list(policies)})")
  if config.judge not in ("labeler", "reward_model"):
    raise config_lib.ConfigError(f"config.judge={config.judge!r}: use 'labeler' or 'reward_model'")
  if config.best_of_n < 0 or config.best_of_n & (config.best_of_n - 1):
    raise config_lib.ConfigError(f"config.best_of_n={config.best_of_n}: use 0 (off) or a power of two")
  if config.best_of_n and config.judge != "labeler":
    raise config_lib.ConfigError("config.best_of_n needs config.judge='labeler' (it compares the reward "
                     "model's picks with the labeler's); set config.best_of_n=0")
  if config.judge == "reward_model" and not config.reward_model:
    raise config_lib.ConfigError("config.judge='reward_model' needs config.reward_model (an RM export)")
  if len(names) < 2:
    raise config_lib.ConfigError("config.policies: name at least two policies (one is the baseline)")
  return policies


def evaluate_policies(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Answers, judges and measures; writes results.json, responses.jsonl and the report.

  Returns the results dict (also `summary.json`, so a pipeline rerun skips it).
  """
  t0 = time.time()
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  policies = check_config(config)
  parallel.configure(config.get("parallel"))
  baseline_path = policies[config.baseline]
  tokenizer = models.load_tokenizer(config.tokenizer or baseline_path)
  encoder = tokenize_lib.Encoder(tokenizer)
  use_labeler = config.judge == "labeler"
  files = policy_inputs.prompt_files(config)
  prompts = policy_inputs.read_prompts(files, need_meta=use_labeler,
                                       limit=config.num_prompts)
  metas = [world_lib.task_meta(p.meta) for p in prompts] if use_labeler else None
  logging.info("evaluate: %d prompts from %s; %d policies", len(prompts), files,
               len(policies) + bool(config.few_shot.base))

  generation = generation_lib.Generation(
      max_new_tokens=config.max_response_len, temperature=config.temperature,
      top_k=config.top_k, top_p=config.top_p, greedy=config.greedy,
      stop_token_id=encoder.eos_id, pad_token_id=encoder.pad_id)
  programs = generation_lib.Programs(generation)
  per_device = config.per_device_batch
  judge_prompts = policy_lib.encode_prompts(prompts, encoder, config.max_prompt_len,
                                            config.get("length_bucket", 0))

  # --- What every policy is measured against --------------------------------------------
  reference = None
  if config.reference:
    ref_model, ref_params = policy_runs.load_causal_lm(policies[config.reference])
    reference = (ref_model, parallel.replicate(ref_params))
  reward = None
  if config.reward_model:
    rm_model, rm_params = models.from_pretrained(config.reward_model)
    if not isinstance(rm_model, models.ScalarHeadModel):
      raise config_lib.ConfigError(f"config.reward_model={config.reward_model!r} is a causal LM, not "
                       "a reward model (no score head)")
    reward = (rm_model, parallel.replicate(rm_params))
  text_file = config.pretrain_file
  if not text_file and config.world_dir:
    world_text = epath.Path(config.world_dir) / "pretrain" / "validation.jsonl"
    text_file = str(world_text) if world_text.exists() else ""
  held_out_text = (policy_inputs.text_batches(text_file, tokenizer, config.max_text_len,
                                              per_device, config.num_text_batches)
                   if text_file else None)

  # --- Answers and measurements, one checkpoint load per policy ------------------------
  def policy_params(name, path):
    """(model, replicated params); the reference policy's are already loaded."""
    if reference is not None and name == config.reference:
      return reference
    model, params = policy_runs.load_causal_lm(path)
    return model, parallel.replicate(params)

  def run_policy(name, path, prompt_arrays, few_shot=False):
    model, rparams = policy_params(name, path)
    run = policy_runs.answer_prompts(name, path, model, rparams, programs=programs,
                                     tokenizer=tokenizer, encoder=encoder,
                                     prompt_arrays=prompt_arrays, per_device=per_device,
                                     seed=config.seed, few_shot=few_shot)
    policy_runs.measure(run, model, rparams, programs=programs, judge_prompts=judge_prompts,
                        per_device=per_device, reference=reference, reward=reward,
                        text_batches_=held_out_text)
    return run

  runs: dict[str, policy_runs.PolicyRun] = {}
  for name, path in policies.items():
    runs[name] = run_policy(name, path, judge_prompts)
  if config.few_shot.base:
    chats = [p.source for p in prompts if p.is_chat]
    if chats:
      raise config_lib.ConfigError(
          f"config.few_shot.base: the few-shot prompt is text, and {chats[0]} is a chat "
          "prompt (a base model has no chat template); set config.few_shot.base='' for "
          "chat prompts.")
    shots_file = config.few_shot.examples_file or str(
        epath.Path(config.world_dir) / "sft" / "train.jsonl")
    prefix = policy_inputs.few_shot_prefix(
        formats.read_examples("demonstrations", shots_file), config.few_shot.num_shots,
        tokenizer.eos_token, config.seed)
    few_shot_prompts = policy_lib.encode_prompts(
        [f"{prefix} {p.prompt}" for p in prompts], encoder, config.few_shot.max_prompt_len,
        config.get("length_bucket", 0))
    runs[config.few_shot.name] = run_policy(config.few_shot.name, config.few_shot.base,
                                            few_shot_prompts, few_shot=True)

  # --- Judging -------------------------------------------------------------------------
  baseline = runs[config.baseline]
  labeler = _world_labeler(config) if use_labeler else None
  # A labeler of a group that wrote no training data (own weights and noise).
  held_out = labeler_lib.Labeler.held_out(seed=config.seed + 1) if use_labeler else None
  results = {
      "judge": config.judge, "baseline": config.baseline,
      "reference": config.reference or None, "num_prompts": len(prompts),
      "prompt_files": files, "reward_model": config.reward_model or None,
      "pretrain_file": text_file or None, "temperature": config.temperature,
      "greedy": config.greedy, "policy_order": list(runs), "policies": {},
  }
  for name, run in runs.items():
    entry: dict[str, Any] = {
        "path": run.path, "few_shot": run.few_shot,
        "response_length": float(run.lengths.mean()),
        "stopped_fraction": float(run.stopped.mean()),
        "kl_from_reference": None if run.kl is None else float(run.kl.mean()),
        "pretrain_nll": run.pretrain_nll,
        "alignment_tax": (None if run.pretrain_nll is None or baseline.pretrain_nll is None
                          else run.pretrain_nll - baseline.pretrain_nll),
        "rm_score": None if run.rm_scores is None else float(run.rm_scores.mean()),
    }
    if name == config.baseline:
      entry["win_rate"] = None  # 50% by definition
    else:
      if use_labeler:
        entry["labeler"] = judging.win_rate(judging.labeler_outcomes(labeler, metas, run,
                                                                     baseline, config.seed))
        entry["held_out_labelers"] = judging.win_rate(judging.labeler_outcomes(
            held_out, metas, run, baseline, config.seed + 1))
      if run.rm_scores is not None:
        entry["rm_judged"] = judging.win_rate(judging.score_outcomes(run.rm_scores,
                                                                     baseline.rm_scores))
      headline = entry["labeler"] if use_labeler else entry["rm_judged"]
      entry["win_rate"], entry["win_rate_ci95"] = headline["win_rate"], headline["ci95"]
    if use_labeler:
      entry.update(judging.task_table(metas, run))
    results["policies"][name] = entry

  if use_labeler:
    results["reference_answers"] = judging.reference_answers(metas, labeler, baseline,
                                                             config.seed)
  if use_labeler and config.best_of_n:
    model, rparams = policy_params(config.baseline, baseline_path)
    candidates = []
    for j in range(config.best_of_n):
      candidate = policy_runs.answer_prompts(
          f"{config.baseline}/candidate_{j}", baseline_path, model, rparams,
          programs=programs, tokenizer=tokenizer, encoder=encoder,
          prompt_arrays=judge_prompts, per_device=per_device, seed=config.seed)
      policy_runs.measure(candidate, model, rparams, programs=programs,
                          judge_prompts=judge_prompts, per_device=per_device, reference=None,
                          reward=reward, text_batches_=None)
      candidates.append(candidate)
    results["best_of_n"] = judging.best_of_n(candidates, metas, labeler, baseline,
                                             config.seed)
  if use_labeler and reward is not None and config.get("rankings_file"):
    results["reward_model_check"] = judging.reward_model_check(
        config.rankings_file, rm_model, rm_params, tokenizer,
        max_prompt_len=config.max_prompt_len, max_response_len=config.max_response_len,
        per_device_batch_size=per_device, held_out=held_out, seed=config.seed)

  # --- Outputs -------------------------------------------------------------------------
  results["samples"] = [
      {"prompt": _prompt_record(prompts[i]),
       "responses": {name: run.texts[i] for name, run in runs.items()}}
      for i in _spread(len(prompts), config.num_sample_texts)]
  from jaxrlhf.eval import report  # pylint: disable=g-import-not-at-top
  pipeline_dir = epath.Path(config.pipeline_dir) if config.pipeline_dir else None
  results["gold_vs_proxy"] = judging.gold_vs_proxy(report.ppo_histories(pipeline_dir),
                                                   results)
  results["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    # With the world's prompts, each answer carries what the labeler records of it
    # (its Likert rating and closed-domain hallucination), as the paper's labelers did.
    records = ({"prompt": _prompt_record(p), **({"meta": p.meta} if p.meta else {}),
                "responses": {name: run.texts[i] for name, run in runs.items()},
                "stopped": {name: bool(run.stopped[i]) for name, run in runs.items()},
                **({"labeler": {name: labeler_lib.metadata(p.meta, run.texts[i],
                                                           bool(run.stopped[i]))
                                for name, run in runs.items()}} if use_labeler and p.meta
                   else {})}
               for i, p in enumerate(prompts))
    formats.write_jsonl(str(workdir / "responses.jsonl"), records)
    checkpoint_lib.save_json(workdir / "results.json", results)
    report_dir = epath.Path(config.report_dir) if config.report_dir else workdir
    results["report"] = str(report.write_report(report_dir, results,
                                                pipeline_dir=config.pipeline_dir or None))
    checkpoint_lib.save_json(workdir / "summary.json", results)
  parallel.sync_global_devices("evaluate_policies")
  print_results(results)
  return results


def _spread(total: int, count: int) -> list[int]:
  """`count` indices spread evenly over range(total), so samples cover every prompt file."""
  if count <= 0 or total == 0:
    return []
  count = min(count, total)
  return sorted({int(i) for i in np.linspace(0, total - 1, count)})


def print_results(results: dict) -> None:
  """The table every printer of an evaluation shares (jaxrlhf/summaries.py)."""
  evaluation = summaries_lib.Evaluation.from_summary(results)
  print(f"\n[evaluate] {evaluation.header()}", flush=True)
  for line in evaluation.lines():
    print(f"  {line}", flush=True)
  if results.get("report"):
    print(f"  report: {results['report']}", flush=True)
