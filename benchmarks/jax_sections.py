"""jaxrlhf's side of the benchmark: its compiled SFT, RM and PPO steps and its sampler.

Each section builds random-weight models of the benchmark's shape, runs the library's own
step functions through `parallel` (as the stages do) and returns common.throughput
entries; report.run puts them next to torch_sections' figures.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxrlhf import models
from jaxrlhf import optim
from jaxrlhf import parallel
from jaxrlhf import ppo
from jaxrlhf import reward_model
from jaxrlhf import sampling
from jaxrlhf import sft
from jaxrlhf import train_lib
from jaxrlhf.data import buckets


@functools.lru_cache(maxsize=4)
def random_params(model, seed: int):
  """Host (numpy) random params of `model`, made once per model and seed and shared by
  the sections: every consumer copies them onto its devices, so none is donated away."""
  init = jax.jit(functools.partial(models.init_params, model, seq_len=8))
  return jax.device_get(init(jax.random.key(seed)))


def _on_devices(batch: dict, devices) -> dict:
  return parallel.device_put_sharded(parallel.shard(batch, len(devices)), devices)


def _optimizer(config):
  tx, _ = optim.make_optimizer(common.optimizer_config(config))
  return tx


def jax_sft(config, mcfg, devices, peak) -> dict:
  """One SFT/pretraining train step (forward, backward, AdamW, norms, NaN guard)."""
  model = models.CausalLM(mcfg)
  params = random_params(model, config.seed)
  state = train_lib.create_train_state(model.apply, params, _optimizer(config), config.seed)
  rstate = [parallel.replicate(state, devices)]
  del state, params
  step = parallel.pmap_step(functools.partial(sft.lm_train_step, dropout=False),
                            devices=devices)
  host = common.lm_batch(mcfg, config.train_batch_size, config.seq_len)
  batch = _on_devices(host, devices)

  def call():
    rstate[0], metrics = step(rstate[0], batch)
    common.block(metrics)

  timing = common.time_calls(call, warmup=config.warmup, repeats=config.repeats)
  tokens = float(host["input_ids"].size)
  flops = tokens * common.train_flops_per_token(mcfg, config.seq_len)
  return common.throughput(timing, tokens, flops, peak) | {
      "compiled_memory": common.compiled_memory(step, rstate[0], batch)}


def jax_rm(config, mcfg, devices, peak) -> dict:
  """One reward-model train step on K-way rankings (all C(K, 2) pairs per prompt)."""
  model = models.ScalarHeadModel(mcfg)
  params = random_params(model, config.seed)
  state = train_lib.create_train_state(model.apply, params, _optimizer(config), config.seed)
  rstate = [parallel.replicate(state, devices)]
  del state, params
  step = parallel.pmap_step(functools.partial(reward_model.rm_train_step, dropout=False),
                            devices=devices)
  host = common.ranking_batch(mcfg, config.rm_batch_size, config.rm_k, config.rm_seq_len)
  # The loaders' layout: each device's responses packed into rows (data/buckets.py).
  sharded = parallel.shard(dict(host, response_valid=np.ones(host["end_index"].shape,
                                                              np.int32)), len(devices))
  rows = sharded["input_ids"].shape[1] * config.rm_k
  batch = parallel.device_put_sharded(
      buckets.cut("rankings", sharded, (config.rm_seq_len, rows)), devices)

  def call():
    rstate[0], metrics = step(rstate[0], batch)
    common.block(metrics)

  timing = common.time_calls(call, warmup=config.warmup, repeats=config.repeats)
  comparisons = float(host["pair_mask"].sum())
  tokens = float(host["input_ids"].size)
  flops = tokens * common.train_flops_per_token(mcfg, config.rm_seq_len, head="scalar")
  return common.throughput(timing, comparisons, flops, peak) | {
      "tokens": tokens, "compiled_memory": common.compiled_memory(step, rstate[0], batch)}


def jax_sampler(config, mcfg, batch_size: int, peak) -> dict:
  """`sampling.sample` (prefill, then a while_loop over the KV cache), jitted once."""
  model = models.CausalLM(mcfg)
  params = jax.device_put(random_params(model, config.seed))  # once, not per call
  prompts = common.prompt_batch(mcfg, batch_size, config.prompt_len)
  prompt_ids = jnp.asarray(prompts["prompt_ids"])
  prompt_mask = jnp.asarray(prompts["prompt_mask"])
  rng = jax.random.key(config.seed)

  def call():
    out = sampling.sample(model, params, prompt_ids, prompt_mask, rng,
                          max_new_tokens=config.new_tokens, stop_token_id=None,
                          pad_token_id=0)
    out.response_ids.block_until_ready()

  timing = common.time_calls(call, warmup=config.warmup, repeats=config.repeats)
  tokens = float(batch_size * config.new_tokens)
  flops = common.sampling_flops(mcfg, batch_size, config.prompt_len, config.new_tokens)
  return common.throughput(timing, tokens, flops, peak)


def jax_ppo(config, mcfg, devices, settings: ppo.PPOSettings, peak) -> dict:
  """One PPO iteration, timed in its three parts and as the one pmapped call it is.

  `settings` (common.ppo_settings) is the object torch_sections.torch_ppo is built from
  too; the KL coefficient is `config.ppo_kl_coef` in both.
  """
  policy_model, value_model = models.CausalLM(mcfg), models.ScalarHeadModel(mcfg)
  tx = _optimizer(config)
  state = ppo.create_ppo_state(
      policy_model=policy_model, sft_params=random_params(policy_model, config.seed),
      value_model=value_model, reward_params=random_params(value_model, config.seed + 1),
      policy_tx=tx, value_tx=tx, init_kl_coef=config.ppo_kl_coef, seed=config.seed)
  rstate = [parallel.replicate(state, devices)]
  del state
  prompts = _on_devices(common.prompt_batch(mcfg, config.ppo_batch_size, config.prompt_len),
                        devices)

  def sample(state, prompts):
    key = parallel.device_rng(jax.random.key(config.seed))
    out = sampling.sample(
        policy_model, state.policy.params, prompts["prompt_ids"], prompts["prompt_mask"],
        key, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_k=settings.top_k, top_p=settings.top_p, stop_token_id=settings.stop_token_id,
        pad_token_id=settings.pad_token_id)
    return out.response_ids, out.logprobs

  def score(state, prompts, response_ids, logprobs):
    return ppo.score_responses(state, prompts["prompt_ids"], prompts["prompt_mask"],
                               response_ids, logprobs, settings=settings)

  def update(state, batch):
    def body(state, update_index):
      return ppo.update_step(state, batch, None, update_index, settings=settings)
    return jax.lax.scan(body, state, jnp.arange(settings.updates_per_iteration))

  sample_p = parallel.pmap_fn(sample, devices=devices)
  score_p = parallel.pmap_fn(score, devices=devices)
  update_p = parallel.pmap_step(update, devices=devices)
  iteration_p = parallel.pmap_step(functools.partial(
      ppo.train_iteration, policy_model=policy_model, settings=settings), devices=devices)

  sampled = [None]
  scored = [None]

  def call_sample():
    sampled[0] = common.block(sample_p(rstate[0], prompts))

  def call_score():
    scored[0] = common.block(score_p(rstate[0], prompts, *sampled[0]))

  def call_update():
    rstate[0], metrics = update_p(rstate[0], scored[0][0])
    common.block(metrics)

  def call_iteration():
    rstate[0], metrics = iteration_p(rstate[0], prompts, None)
    common.block(metrics)

  kw = dict(warmup=config.warmup, repeats=config.repeats)
  flops = common.ppo_flops(config, mcfg, settings)
  episodes = float(config.ppo_batch_size)
  out = {
      "rollout": common.throughput(common.time_calls(call_sample, **kw),
                                   episodes * settings.max_new_tokens, flops["rollout"],
                                   peak),
      "scoring": common.throughput(common.time_calls(call_score, **kw), episodes,
                                   flops["scoring"], peak),
      "update": common.throughput(common.time_calls(call_update, **kw), episodes,
                                  flops["update"], peak),
  }
  out["update"]["compiled_memory"] = common.compiled_memory(update_p, rstate[0],
                                                            scored[0][0])
  if config.ppo_full_iteration:
    out["iteration"] = common.throughput(common.time_calls(call_iteration, **kw), episodes,
                                         sum(flops.values()), peak)
  return out
