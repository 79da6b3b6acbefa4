"""The same work in PyTorch: transformers' models of the benchmark's shape, eager.

AdamW train steps for SFT and the reward model, `generate` with the KV cache for the
sampler, and a plain PyTorch PPO iteration. The PPO iteration is built from the same
`ppo.PPOSettings` object as jaxrlhf's (common.ppo_settings); its losses are small
functions here, each the counterpart of one in jaxrlhf/losses.py. Imported only when
torch is installed (report.run).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import transformers

from benchmarks import common
from jaxrlhf import models
from jaxrlhf import ppo


def _device(config) -> torch.device:
  return common.torch_device_of(config.get("torch_device", "cpu"))


def _autocast(config, device: torch.device):
  """torch.autocast in bfloat16 when the benchmark's dtype is, over float32 parameters
  (jaxrlhf's mixed precision); nothing in float32."""
  if config.get("dtype", "float32") == "bfloat16":
    return torch.autocast(device.type, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def cuda_peak_bytes() -> int | None:
  """torch's CUDA allocator peak since the last call (then reset), None without CUDA;
  the memory torch's cache still holds goes back to the device, for jax's next section."""
  if not torch.cuda.is_available():
    return None
  peak = int(torch.cuda.max_memory_allocated())
  torch.cuda.reset_peak_memory_stats()
  torch.cuda.empty_cache()
  return peak


def _torch_models(mcfg):
  hf = models.config_to_hf(mcfg)
  hf.pop("architectures", None)
  hf_config = transformers.AutoConfig.for_model(**hf)
  hf_config.use_cache = True

  def causal_lm(seed):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)

  class ScalarHead(torch.nn.Module):
    """The trunk and a hidden -> 1 head on every position, like ScalarHeadModel."""

    def __init__(self, seed):
      super().__init__()
      torch.manual_seed(seed)
      self.trunk = transformers.AutoModel.from_config(hf_config, dtype=torch.float32)
      self.head = torch.nn.Linear(mcfg.hidden_size, 1)

    def forward(self, input_ids, attention_mask):
      hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state
      return self.head(hidden)[..., 0]

  return causal_lm, ScalarHead


def _torch_trainer(config, model):
  """AdamW on `model` with jaxrlhf's optimizer fields (common.optimizer_config): returns
  step(loss_fn) -> loss, one update with the gradient norm clipped as jaxrlhf clips it."""
  cfg = common.optimizer_config(config)
  optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
  clip_norm = cfg.grad_clip_norm
  device = _device(config)

  def step(loss_fn):
    with _autocast(config, device):  # the forward pass; backward runs outside it
      loss = loss_fn()
    loss.backward()
    if clip_norm:  # 0 turns clipping off, as in optim.make_optimizer
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  return step


def torch_sft(config, mcfg, peak) -> dict:
  causal_lm, _ = _torch_models(mcfg)
  device = _device(config)
  model = causal_lm(config.seed).to(device).train()
  train_step = _torch_trainer(config, model)
  host = common.lm_batch(mcfg, config.train_batch_size, config.seq_len)
  ids = torch.from_numpy(host["input_ids"]).long().to(device)
  mask = torch.from_numpy(host["attention_mask"]).long().to(device)

  def call():
    train_step(lambda: model(input_ids=ids, attention_mask=mask, labels=ids,
                             use_cache=False).loss).item()

  timing = common.time_calls(call, warmup=config.warmup, repeats=config.repeats)
  tokens = float(ids.numel())
  return common.throughput(
      timing, tokens, tokens * common.train_flops_per_token(mcfg, config.seq_len), peak)


def torch_rm(config, mcfg, peak) -> dict:
  _, scalar_head = _torch_models(mcfg)
  device = _device(config)
  model = scalar_head(config.seed).to(device).train()
  train_step = _torch_trainer(config, model)
  host = common.ranking_batch(mcfg, config.rm_batch_size, config.rm_k, config.rm_seq_len)
  batch, k, t = host["input_ids"].shape
  ids = torch.from_numpy(host["input_ids"]).long().reshape(-1, t).to(device)
  mask = torch.from_numpy(host["attention_mask"]).long().reshape(-1, t).to(device)
  end = torch.from_numpy(host["end_index"]).long().reshape(-1, 1).to(device)
  pair_mask = torch.from_numpy(host["pair_mask"]).to(device)

  def loss_fn():
    scores = model(ids, mask).gather(1, end)[:, 0].float().reshape(batch, k)
    diffs = scores[:, :, None] - scores[:, None, :]
    terms = F.logsigmoid(diffs) * pair_mask
    return -(terms.sum((1, 2)) / pair_mask.sum((1, 2))).mean()

  def call():
    train_step(loss_fn).item()

  timing = common.time_calls(call, warmup=config.warmup, repeats=config.repeats)
  tokens = float(ids.numel())
  flops = tokens * common.train_flops_per_token(mcfg, config.rm_seq_len, head="scalar")
  return common.throughput(timing, float(pair_mask.sum()), flops, peak) | {"tokens": tokens}


def _generate(model, ids, mask, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
              eos_token_id=None, pad_token_id=0):
  return model.generate(
      input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k, top_p=top_p,
      temperature=temperature, max_new_tokens=max_new_tokens, min_new_tokens=0,
      use_cache=True, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
      bos_token_id=None)


def torch_sampler(config, mcfg, batch_size: int, peak) -> dict:
  causal_lm, _ = _torch_models(mcfg)
  device = _device(config)
  model = causal_lm(config.seed).to(device).eval()
  prompts = common.prompt_batch(mcfg, batch_size, config.prompt_len)
  ids = torch.from_numpy(prompts["prompt_ids"]).long().to(device)
  mask = torch.from_numpy(prompts["prompt_mask"]).long().to(device)

  def call():
    with torch.no_grad(), _autocast(config, device):
      out = _generate(model, ids, mask, max_new_tokens=config.new_tokens)
    _sync(device)
    assert out.shape[1] == config.prompt_len + config.new_tokens, out.shape

  timing = common.time_calls(call, warmup=config.warmup, repeats=config.repeats)
  tokens = float(batch_size * config.new_tokens)
  flops = common.sampling_flops(mcfg, batch_size, config.prompt_len, config.new_tokens)
  return common.throughput(timing, tokens, flops, peak)


# ---------------------------------------------------------------------------------------
# PPO: one small function per piece of jaxrlhf's iteration, each driven by PPOSettings.
# ---------------------------------------------------------------------------------------


def check_ppo_settings(settings: ppo.PPOSettings) -> None:
  """The PyTorch iteration is plain PPO with a fixed KL coefficient; it says so."""
  if settings.ptx_coef:
    raise ValueError(f"PPOSettings.ptx_coef={settings.ptx_coef}: the PyTorch PPO of the "
                     "benchmark has no pretraining term (expected 0).")
  if settings.kl_controller != "fixed":
    raise ValueError(f"PPOSettings.kl_controller={settings.kl_controller!r}: the PyTorch "
                     "PPO of the benchmark keeps beta fixed (expected 'fixed').")


def sampling_options(settings: ppo.PPOSettings) -> dict:
  """`_generate`'s keywords for the rollout: what jaxrlhf's rollout samples with."""
  return dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
              top_k=settings.top_k, top_p=settings.top_p,
              eos_token_id=settings.stop_token_id, pad_token_id=settings.pad_token_id)


def token_logprobs(logits, targets, settings: ppo.PPOSettings):
  """losses.token_logprobs: log softmax(logits / temperature) at `targets`, float32."""
  logits = logits.float()
  if settings.temperature != 1.0:  # a pass over [batch, N, vocab] that changes nothing at 1
    logits = logits / settings.temperature
  return torch.gather(F.log_softmax(logits, -1), 2, targets[..., None])[..., 0]


def advantages_and_returns(logprobs, ref_logprobs, values, scores, stopped, response_mask,
                           *, kl_coef: float, settings: ppo.PPOSettings):
  """Per-token KL rewards with the score on the last real token, GAE, whitening.

  losses.per_token_rewards, losses.gae and losses.whiten in one: scores of responses that
  never stopped are replaced by `settings.penalty_score` (ppo.rollout's rollout_scores).

  Args:
    logprobs, ref_logprobs, values: [batch, N], already 0 where `response_mask` is 0.
    scores: [batch] the reward model read at the last real response token.
    stopped: [batch] bool, whether the response emitted the stop token.
    response_mask: [batch, N] float, 1 up to and including the first stop token.
    kl_coef: beta.
    settings: the PPO settings (penalty_score, gae_gamma, gae_lambda).

  Returns:
    (whitened advantages, returns), both [batch, N]; the advantages are whitened over the
    masked entries and meaningful only there.
  """
  gamma, lam = settings.gae_gamma, settings.gae_lambda
  batch, length = response_mask.shape
  last = response_mask.sum(1).long().clamp(min=1) - 1  # [batch] last real token
  scores = torch.where(stopped, scores, torch.full_like(scores, settings.penalty_score))
  rewards = -kl_coef * (logprobs - ref_logprobs)
  rewards[torch.arange(batch), last] += scores
  # values are 0 past the end, so the value after the last real token bootstraps to 0.
  deltas = rewards + gamma * F.pad(values[:, 1:], (0, 1)) - values
  advantages, next_advantage = torch.zeros_like(rewards), torch.zeros(batch)
  for t in reversed(range(length)):
    next_advantage = (deltas[:, t] + gamma * lam * next_advantage) * response_mask[:, t]
    advantages[:, t] = next_advantage
  returns = advantages + values
  count = response_mask.sum()
  mean = (advantages * response_mask).sum() / count
  variance = (((advantages - mean) ** 2) * response_mask).sum() / count
  return (advantages - mean) / torch.sqrt(variance + 1e-8), returns  # losses.whiten's eps


def policy_loss(logprobs, old_logprobs, advantages, response_mask,
                settings: ppo.PPOSettings):
  """losses.ppo_policy_loss's token mean: max(-A r, -A clip(r, 1 - eps, 1 + eps))."""
  ratio = torch.exp(logprobs - old_logprobs)
  clipped = ratio.clamp(1.0 - settings.clip_eps, 1.0 + settings.clip_eps)
  surrogate = torch.max(-advantages * ratio, -advantages * clipped)
  return (surrogate * response_mask).sum() / response_mask.sum().clamp(min=1)


def value_loss(values, old_values, returns, response_mask, settings: ppo.PPOSettings):
  """losses.value_loss's token mean: 0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
  eps = settings.value_clip_eps
  clipped = old_values + (values - old_values).clamp(-eps, eps)
  loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
  return 0.5 * (loss * response_mask).sum() / response_mask.sum().clamp(min=1)


def minibatch_rows(batch_size: int, settings: ppo.PPOSettings) -> list:
  """Row indices of every update: `num_epochs` shuffles, each cut into `num_minibatches`."""
  size = batch_size // settings.num_minibatches
  return [rows for _ in range(settings.num_epochs)
          for rows in torch.randperm(batch_size).split(size)]


def torch_ppo(config, mcfg, settings: ppo.PPOSettings, peak) -> dict:
  """The same iteration in plain PyTorch: generate; four no-grad forwards with KL rewards
  and GAE; clipped policy and value updates (AdamW) over the minibatches of every epoch.

  Built from `settings`, the object jax_sections.jax_ppo gets (sampling, stop and pad
  tokens, penalty score, GAE, clips, epochs, minibatches), and `config.ppo_kl_coef`.
  jaxrlhf's update also keeps an EMA of the policy (ema_decay); this one does not.
  """
  check_ppo_settings(settings)
  causal_lm, scalar_head = _torch_models(mcfg)
  device = _device(config)
  policy, ref = causal_lm(config.seed).to(device), causal_lm(config.seed).to(device).eval()
  value = scalar_head(config.seed + 1).to(device)
  reward = scalar_head(config.seed + 1).to(device).eval()
  policy_step = _torch_trainer(config, policy)
  value_step = _torch_trainer(config, value)
  prompts = common.prompt_batch(mcfg, config.ppo_batch_size, config.prompt_len)
  prompt_ids = torch.from_numpy(prompts["prompt_ids"]).long().to(device)
  prompt_mask = torch.from_numpy(prompts["prompt_mask"]).long().to(device)
  p, n = config.prompt_len, settings.max_new_tokens
  state = {}

  def logprobs_of(model, seq, mask):
    logits = model(input_ids=seq, attention_mask=mask, use_cache=False).logits[:, p - 1:-1]
    return token_logprobs(logits.float(), seq[:, p:], settings)

  def call_rollout():
    policy.eval()
    with torch.no_grad(), _autocast(config, device):
      seq = _generate(policy, prompt_ids, prompt_mask, **sampling_options(settings))
    seq = F.pad(seq, (0, p + n - seq.shape[1]), value=settings.pad_token_id)
    response = seq[:, p:]
    is_stop = (response == settings.stop_token_id).long()
    response_mask = ((torch.cumsum(is_stop, 1) - is_stop) == 0).float()
    state["seq"] = seq
    state["mask"] = torch.cat([prompt_mask, response_mask.long()], 1)
    state["response_mask"] = response_mask
    state["stopped"] = is_stop.sum(1) > 0
    _sync(device)

  def call_scoring():
    seq, mask, rmask = state["seq"], state["mask"], state["response_mask"]
    with torch.no_grad(), _autocast(config, device):
      logprobs = logprobs_of(policy, seq, mask) * rmask
      ref_logprobs = logprobs_of(ref, seq, mask) * rmask
      values = value(seq, mask)[:, p - 1:-1].float() * rmask
      last = p + rmask.sum(1).long().clamp(min=1) - 1
      scores = reward(seq, mask).gather(1, last[:, None])[:, 0].float()
      advantages, returns = advantages_and_returns(
          logprobs, ref_logprobs, values, scores, state["stopped"], rmask,
          kl_coef=config.ppo_kl_coef, settings=settings)
    state.update(old_logprobs=logprobs, old_values=values, advantages=advantages,
                 returns=returns)
    _sync(device)

  def call_update():
    policy.train()
    value.train()
    for rows in minibatch_rows(config.ppo_batch_size, settings):
      mb = {k: v[rows] for k, v in state.items()}
      policy_step(lambda: policy_loss(
          logprobs_of(policy, mb["seq"], mb["mask"]), mb["old_logprobs"], mb["advantages"],
          mb["response_mask"], settings)).item()
      value_step(lambda: value_loss(
          value(mb["seq"], mb["mask"])[:, p - 1:-1].float(), mb["old_values"],
          mb["returns"], mb["response_mask"], settings)).item()

  kw = dict(warmup=config.warmup, repeats=config.repeats)
  flops = common.ppo_flops(config, mcfg, settings)
  episodes = float(config.ppo_batch_size)
  out = {
      "rollout": common.throughput(common.time_calls(call_rollout, **kw), episodes * n,
                                   flops["rollout"], peak),
      "scoring": common.throughput(common.time_calls(call_scoring, **kw), episodes,
                                   flops["scoring"], peak),
      "update": common.throughput(common.time_calls(call_update, **kw), episodes,
                                  flops["update"], peak),
  }
  if config.ppo_full_iteration:
    def call_iteration():
      call_rollout()
      call_scoring()
      call_update()
    out["iteration"] = common.throughput(common.time_calls(call_iteration, **kw), episodes,
                                         sum(flops.values()), peak)
  return out
