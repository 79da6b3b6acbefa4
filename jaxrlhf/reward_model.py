"""Reward model (InstructGPT step 2): K-way rankings, all C(K,2) pairs as one example.

Each batch element holds every response to one prompt; each response is forwarded once
and all comparisons are formed from those K scores, so the comparisons of one prompt
never straddle batches. After training, the score head is shifted (and optionally
scaled) so labeler demonstrations score mean 0; the scaling is folded into the head's
weights, so every consumer of the exported model sees the same scale.
"""

from __future__ import annotations

import functools
import json
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrlhf import config_lib
from jaxrlhf import data as data_pkg
from jaxrlhf import data_lib
from jaxrlhf import evaluators
from jaxrlhf import losses
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import scoring
from jaxrlhf import stage_lib
from jaxrlhf import train_lib


# ---------------------------------------------------------------------------------------
# Scores and steps (pure; pmapped once below).
# ---------------------------------------------------------------------------------------


def _ranking_metrics(scores, batch):
  pair_mask = batch["pair_mask"]
  return {
      "loss": losses.ranking_loss(scores, pair_mask),
      "accuracy": losses.pairwise_accuracy(scores, pair_mask),
      "score_gap": losses.score_gap(scores, pair_mask),
  }


def rm_train_step(state: train_lib.TrainState, batch: dict, *, dropout: bool):
  rng = train_lib.step_rng(state)

  def loss_fn(params):
    scores = scoring.ranking_scores(state.apply_fn, params, batch,
                                    deterministic=not dropout, rngs={"dropout": rng})  # [B, K]
    metrics = _ranking_metrics(scores, batch)
    # Mean over prompts of the global batch (each prompt already averages its pairs).
    global_count = jnp.maximum(parallel.psum(metrics["loss"].count), 1.0)
    return metrics["loss"].total / global_count, metrics

  (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = parallel.psum(grads)
  sums = parallel.psum(sums)
  loss = sums["loss"].mean()
  new_state, norms = train_lib.apply_gradients_guarded(state, grads, loss)
  return new_state, {"loss": loss, "accuracy": sums["accuracy"].mean(),
                     "score_gap": sums["score_gap"].mean(),
                     "comparisons": sums["accuracy"].count, **norms}


def rm_eval_step(params, batch: dict, *, apply_fn):
  scores = scoring.ranking_scores(apply_fn, params, batch)
  return parallel.psum(_ranking_metrics(scores, batch))


# ---------------------------------------------------------------------------------------
# Normalisation, folded into the score head.
# ---------------------------------------------------------------------------------------


def fold_normalization(params, gain: float, bias: float):
  """Returns params whose scores are gain * score + bias (exactly, by linearity)."""
  head = params["score_head"]
  new_head = {"kernel": head["kernel"] * gain, "bias": head["bias"] * gain + bias}
  return {**params, "score_head": new_head}


def fit_normalization(demo_scores: np.ndarray, sample_scores: np.ndarray | None = None):
  """(gain, bias): demonstrations -> mean 0; with samples, samples -> mean 0, std 1.

  The lm-human-preferences convention (samples mean 0 / std 1) keeps beta's meaning
  across runs; the paper's convention (demonstrations mean 0) is the default.
  """
  demo_scores = np.asarray(demo_scores, np.float64)
  if sample_scores is None or len(sample_scores) == 0:
    return 1.0, float(-demo_scores.mean())
  sample_scores = np.asarray(sample_scores, np.float64)
  gain = 1.0 / max(float(sample_scores.std()), 1e-6)
  return gain, float(-gain * sample_scores.mean())


# ---------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the reward model on rankings; exports it normalised to <workdir>/hf."""
  stage = stage_lib.Stage(config.get("name") or "reward_model", config, workdir)
  workdir, tokenizer = stage.workdir, stage.tokenizer
  parallel.check_batch_size(config.batch_size)

  # --- Data -------------------------------------------------------------------------
  data = data_lib.ranking_data(config, tokenizer, workdir)
  num_steps = data_lib.num_train_steps(config, data.num_train_examples)

  # --- Model, state and steps --------------------------------------------------------
  model, state, schedule, train_step_p = stage.one_model(
      "scalar", seq_len=data.seq_len, num_steps=num_steps, train_iter=data.train_iter,
      step_fn=rm_train_step, batches=f"{config.batch_size} ranked prompts")
  if (done := stage.finished_summary(num_steps)) is not None:
    return done
  writer = stage.writer
  eval_step_p = parallel.pmap_fn(functools.partial(rm_eval_step, apply_fn=model.apply))

  accuracy = evaluators.RankingAccuracy(eval_step_p, data.eval_batches)

  # --- Loop -------------------------------------------------------------------------------
  t0 = time.time()
  initial_eval, result = stage.train(
      state, train_step_p, data.train_iter,
      units=lambda b: float(np.sum(b["pair_mask"])), units_name="comparisons",
      num_steps=num_steps, evaluators=[accuracy, evaluators.LearningRate(schedule)],
      initial=[accuracy])
  if result.preempted:
    return stage.preempted(result)

  # --- Normalisation --------------------------------------------------------------------
  score_step_p = parallel.pmap_fn(functools.partial(scoring.score_step, apply_fn=model.apply))
  rparams = result.state.params  # replicated
  host_params = parallel.unreplicate(result.state).params
  demo_scores = scoring.score_batches(score_step_p, rparams, data.demonstration_batches())
  sample_scores = None
  if config.normalize.policy_samples:
    sample_scores = scoring.score_batches(score_step_p, rparams, data.policy_sample_batches())
  gain, bias = fit_normalization(demo_scores, sample_scores)
  params = fold_normalization(host_params, gain, bias)
  norm_demo = scoring.score_batches(score_step_p, parallel.replicate(params),
                                    data.demonstration_batches())
  normalization = {"gain": gain, "bias": bias,
                   "demonstrations": {"count": int(len(demo_scores)),
                                      "mean_before": float(np.mean(demo_scores)),
                                      "mean_after": float(np.mean(norm_demo))}}
  logging.info("reward normalisation: %s", normalization)

  final_eval = evaluators.ranking_metrics(eval_step_p, parallel.replicate(params),
                                          data.eval_batches())
  summary = {
      "stage": "reward_model", "steps": result.step,
      "train_loss": result.last_metrics.get("loss"),
      "initial_eval": initial_eval, "final_eval": final_eval,
      "labeler_agreement": data.labeler_agreement,
      "normalization": normalization, "seconds": time.time() - t0, "data": data.stats(),
  }
  writer.write_scalars(result.step, {f"normalized_{k}": v for k, v in final_eval.items()})
  figures = {"train loss": summary["train_loss"],
             "held-out pairwise accuracy": final_eval.get("eval_accuracy")}
  return stage.finish(summary, figures=figures,
                      exports={"hf": (model, jax.device_get(params))},
                      extra_files={"hf/reward_normalization.json": normalization})


# ---------------------------------------------------------------------------------------
# Scoring (prompt, response) pairs with a trained reward model.
# ---------------------------------------------------------------------------------------


def score_file(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Scores every {"prompt", "response"} line of `config.input_file` with the reward
  model in `config.reward_model`; writes them, with a "score" field, to
  `config.output_file`. The exported model already carries its normalisation."""
  del workdir
  tokenizer = models.load_tokenizer(config.tokenizer or config.reward_model)
  model, params = models.from_pretrained(config.reward_model)
  if not isinstance(model, models.ScalarHeadModel):
    raise config_lib.ConfigError(f"config.reward_model={config.reward_model!r} holds a causal LM, "
                     "not a reward model.")
  stats = data_pkg.DataStats()
  examples = data_pkg.read_examples("demonstrations", config.input_file,
                                             skip_invalid=config.skip_invalid, stats=stats)
  chat = [ex.source for ex in examples if ex.is_chat]
  if chat:
    raise config_lib.ConfigError(f"{chat[0]}: scoring takes {{'prompt', 'response'}} lines, not chats.")
  pairs = [(ex.prompt, ex.response) for ex in examples]
  scores = scoring.score_pairs(model, params, tokenizer, pairs, max_prompt_len=config.max_prompt_len,
                       max_response_len=config.max_response_len,
                       per_device_batch_size=config.per_device_batch_size)
  if jax.process_index() == 0:
    data_pkg.write_jsonl(config.output_file, (
        {"prompt": p, "response": r, "score": float(s)} for (p, r), s in zip(pairs, scores)))
  summary = {"scored": len(pairs), "mean_score": float(np.mean(scores)) if len(pairs) else None,
             "skipped": stats.num_skipped, "output_file": config.output_file}
  print(json.dumps(summary), flush=True)
  return summary
