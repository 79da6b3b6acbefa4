"""Language-model training: pretraining the base model and supervised fine-tuning (SFT).

Both minimise next-token NLL over the tokens that `loss_mask` marks (every token for
pretraining text, response tokens for demonstrations), token-weighted across the global
batch. `train_and_evaluate` runs either, resuming from `workdir` by itself.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrlhf import data_lib
from jaxrlhf import evaluators
from jaxrlhf import parallel
from jaxrlhf import policy_lib
from jaxrlhf import scoring
from jaxrlhf import stage_lib
from jaxrlhf import train_lib


# ---------------------------------------------------------------------------------------
# Steps (pure; pmapped once below).
# ---------------------------------------------------------------------------------------


def lm_loss_and_grads(state: train_lib.TrainState, batch: dict, *, train: bool):
  """Token-weighted NLL over the global batch and its (already summed) gradients."""
  rng = train_lib.step_rng(state)

  def loss_fn(params):
    nll = scoring.lm_nll(state.apply_fn, params, batch, deterministic=not train,
                         rngs={"dropout": rng})
    # Dividing the local sum by the GLOBAL count makes psum(grads) the exact gradient
    # of the token-weighted mean, whatever the tokens per device.
    global_count = jnp.maximum(parallel.psum(nll.count), 1.0)
    return nll.total / global_count, nll

  (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return parallel.psum(nll), parallel.psum(grads)


def lm_train_step(state: train_lib.TrainState, batch: dict, *, dropout: bool):
  nll, grads = lm_loss_and_grads(state, batch, train=dropout)
  loss = nll.mean()
  new_state, norms = train_lib.apply_gradients_guarded(state, grads, loss)
  return new_state, {"loss": loss, "tokens": nll.count, **norms}


# ---------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------


def stage_data(config: ml_collections.ConfigDict, tokenizer, workdir) -> data_lib.StageData:
  """The stage's text (pretraining) or demonstrations (SFT): `config.data`'s two files,
  or the embedded world's where both are empty."""
  pretrain = config.stage == "pretrain"
  # 'flan': the world's "public NLP tasks" collection, the paper's FLAN/T0 baseline.
  dataset = "pretrain" if pretrain else ("flan" if config.stage == "flan" else "sft")
  train_file, valid_file = data_lib.files_or_world(
      config.data, workdir, dataset, train=config.data.train_file,
      valid=config.data.valid_file)
  return data_lib.lm_data(
      "text" if pretrain else "demonstrations", tokenizer,
      train_file=train_file, valid_file=valid_file,
      lengths=data_lib.lengths_from_config(config.data), batch_size=config.batch_size,
      shuffle_seed=config.data.shuffle_seed, skip_invalid=config.data.skip_invalid,
      num_eval_batches=config.get("num_eval_batches", 0),
      fields=config.data.get("fields", ""))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains a causal LM on `config.data` (kind 'pretrain' or 'sft'); returns a summary."""
  # config.stage is what the stage does ('pretrain', 'sft', 'flan'); config.name, where
  # set, what it is called (the pipeline names each stage after its section, e.g.
  # :paper's pretrain_rm, whose stage is 'pretrain').
  stage = stage_lib.Stage(config.get("name") or config.stage, config, workdir)
  workdir, tokenizer = stage.workdir, stage.tokenizer
  per_device = parallel.check_batch_size(config.batch_size)

  # --- Data -------------------------------------------------------------------------
  data = stage_data(config, tokenizer, workdir)
  seq_len = data.seq_len
  num_steps = data_lib.num_train_steps(config, data.num_train_examples)

  # --- Model, state and steps --------------------------------------------------------
  model, state, schedule, train_step_p = stage.one_model(
      "lm", seq_len=seq_len, num_steps=num_steps, train_iter=data.train_iter,
      step_fn=lm_train_step,
      batches=f"{config.batch_size} sequences ({per_device} per device)")
  if (done := stage.finished_summary(num_steps)) is not None:
    return done
  writer = stage.writer
  eval_step_p = parallel.pmap_fn(functools.partial(scoring.lm_eval_step, apply_fn=model.apply))

  prompts = data.sample_prompts[:config.get("num_sample_prompts", 0)]
  sampler = policy_lib.Sampler(
      model, tokenizer, max_prompt_len=config.data.max_prompt_len,
      max_new_tokens=config.data.max_response_len, greedy=True,
      per_device_batch=max(1, -(-len(prompts) // jax.local_device_count())))

  nll = evaluators.HeldOutNLL(eval_step_p, data.eval_batches)
  measured = [nll, evaluators.LearningRate(schedule),
              evaluators.GreedySamples(sampler, prompts, writer)]

  # --- Loop -------------------------------------------------------------------------------
  t0 = time.time()
  initial_eval, result = stage.train(
      state, train_step_p, data.train_iter,
      units=lambda b: float(np.sum(b["attention_mask"])), units_name="tokens",
      num_steps=num_steps, evaluators=measured, initial=[nll])
  if result.preempted:
    return stage.preempted(result)

  summary = {
      "stage": config.stage,
      "steps": result.step,
      "train_loss": result.last_metrics.get("loss"),
      "initial_eval": initial_eval,
      "final_eval": result.eval_history[-1] if result.eval_history else None,
      "seconds": time.time() - t0,
      "data": data.stats(),
  }
  figures = {"train loss": summary["train_loss"],
             "validation loss": (summary["final_eval"] or {}).get("eval_loss")}
  return stage.finish(summary, figures=figures,
                      exports={"hf": (model, parallel.unreplicate(result.state).params)})
