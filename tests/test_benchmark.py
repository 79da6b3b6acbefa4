"""The benchmark runs end to end on the tiny shape (one repeat), so it cannot rot; its
PyTorch PPO follows the same PPOSettings as jaxrlhf's.

Speeds are printed, never asserted; this checks that every section reports sane figures
and that the table and the JSON come out, and checks the PyTorch PPO's pieces against
NumPy loops under settings that differ from every default.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from benchmarks import common
from benchmarks import jax_sections
from benchmarks import report
from benchmarks import torch_sections
from configs import benchmark as benchmark_config
from jaxrlhf import ppo


def test_tiny_benchmark_runs_and_reports(tmp_path):
  config = benchmark_config.get_config("tiny")
  config.repeats = 1
  config.warmup = 0
  # Every code path, fewest compilations: one sampler batch size, the PPO parts only.
  config.sampler_batch_sizes = (8,)
  config.ppo_full_iteration = False
  config.model.num_layers = 1  # compile time grows with the (unrolled) layers
  config.output = str(tmp_path / "bench.json")
  results = report.main(config)

  assert results["host"]["devices"] == ["cpu:0"]  # one device unless configured
  assert results["matmul_peak"]["peak_flops_per_s"] > 0
  expected = {"sft", "rm", "sampler_b8", "ppo"}
  for framework, sections in results["results"].items():
    assert set(sections) == expected, framework
    flat = [sections["sft"], sections["rm"], sections["sampler_b8"],
            *sections["ppo"].values()]
    for entry in flat:
      assert entry["units_per_s"] > 0 and 0 < entry["mfu"] < 1.5, (framework, entry)
      assert entry["peak_rss_bytes"] > 0
  # Two prompts x C(4, 2) comparisons per RM step.
  assert results["results"]["jaxrlhf"]["rm"]["units"] == 12
  assert "| SFT train step | tokens/s |" in results["table"]
  assert json.loads((tmp_path / "bench.json").read_text())["model_name"] == "tiny"


def test_bfloat16_benchmark_measures_both_frameworks_in_bfloat16(tmp_path):
  # The accelerator variants' path (benchmarks/accelerator.sh), on the tiny shape: jax's
  # bfloat16 compute and torch.autocast(bfloat16), the peak measured in bfloat16.
  config = benchmark_config.get_config("tiny")
  config.repeats, config.warmup = 1, 0
  config.sections = ("sft", "rm")
  config.model.num_layers = 1
  config.dtype = "bfloat16"
  config.torch_device = "auto"
  results = report.run(config)
  assert results["dtype"] == results["matmul_peak"]["dtype"] == "bfloat16"
  assert results["torch_device"] == "cpu"  # no GPU here
  for framework in ("jaxrlhf", "pytorch"):
    for section in ("sft", "rm"):
      assert results["results"][framework][section]["units_per_s"] > 0
  memory = results["results"]["jaxrlhf"]["sft"]["compiled_memory"]
  assert memory["argument"] > 0 and memory["peak_estimate"] >= memory["argument"]
  assert results["device_memory"]["sft"] is None  # CPU: no allocator statistics
  assert results["torch_cuda_peak_bytes"]["sft"] is None
  for preset in ("gpu_gpt2", "gpu_1_3b"):
    gpu = benchmark_config.get_config(preset)
    assert gpu.dtype == "bfloat16" and gpu.torch_device == "auto"
  assert common.matmul_params(common.model_config(
      benchmark_config.get_config("gpu_1_3b"))) > 1.2e9


def test_flop_accounting_matches_parameter_count():
  """6N uses the matmul kernels: the trunk's (minus embeddings and norms) plus the head."""
  import jax
  from jaxrlhf import models
  config = common.model_config(benchmark_config.get_config("tiny"))
  params = models.init_params(models.CausalLM(config), jax.random.key(0))
  kernels = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                if x.ndim == 2 and "embed" not in jax.tree_util.keystr(path))
  assert common.matmul_params(config) == kernels


# ---------------------------------------------------------------------------------------
# The PyTorch PPO and its settings.
# ---------------------------------------------------------------------------------------

# Every field the PyTorch PPO reads, away from its default.
SETTINGS = ppo.PPOSettings(
    max_new_tokens=5, stop_token_id=7, pad_token_id=1, temperature=0.7, top_k=3, top_p=0.9,
    penalty_score=-3.0, gae_gamma=0.9, gae_lambda=0.8, clip_eps=0.1, value_clip_eps=0.05,
    num_epochs=3, num_minibatches=2, episodes_per_iteration=8)
DEFAULTS = ppo.PPOSettings(max_new_tokens=5, stop_token_id=7, pad_token_id=1)
KL_COEF = 0.3


def test_ppo_sections_share_one_settings_object(monkeypatch):
  config = benchmark_config.get_config("tiny")
  mcfg = common.model_config(config)
  seen = {}
  monkeypatch.setattr(jax_sections, "jax_ppo",
                      lambda c, m, d, settings, p: seen.setdefault("jax", settings))
  monkeypatch.setattr(torch_sections, "torch_ppo",
                      lambda c, m, settings, p: seen.setdefault("torch", settings))
  (_, jax_fn, torch_fn), = [s for s in report._sections(config, mcfg, [], 1.0, True)
                            if s[0] == "ppo"]
  jax_fn()
  torch_fn()
  assert seen["jax"] is seen["torch"]
  assert seen["jax"] == common.ppo_settings(config, mcfg)


def _episodes(seed=0):
  """Four responses of lengths 5, 3, 1, 5 (the last never stopped); 0 past each end."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((4, 5), np.float32)
  for row, length in enumerate((5, 3, 1, 5)):
    mask[row, :length] = 1
  draw = lambda scale: (rng.normal(size=(4, 5)) * scale * mask).astype(np.float32)
  return dict(logprobs=draw(1.0) - 2 * mask, ref_logprobs=draw(1.0) - 2 * mask,
              values=draw(1.0), scores=rng.normal(size=4).astype(np.float32),
              stopped=np.array([True, True, True, False]), mask=mask,
              advantages=draw(1.0), returns=draw(1.0))


def _reference_advantages(e, settings):
  """Per-token KL rewards, the (penalised) score last, GAE by a loop, then whitening."""
  mask = e["mask"]
  advantages = np.zeros_like(mask, np.float64)
  for row in range(mask.shape[0]):
    length = int(mask[row].sum())
    score = e["scores"][row] if e["stopped"][row] else settings.penalty_score
    rewards = -KL_COEF * (e["logprobs"][row] - e["ref_logprobs"][row]).astype(np.float64)
    rewards[length - 1] += score
    next_advantage = 0.0
    for t in reversed(range(length)):
      next_value = e["values"][row, t + 1] if t + 1 < length else 0.0
      delta = rewards[t] + settings.gae_gamma * next_value - e["values"][row, t]
      next_advantage = delta + settings.gae_gamma * settings.gae_lambda * next_advantage
      advantages[row, t] = next_advantage
  real = mask > 0
  whitened = (advantages - advantages[real].mean()) / np.sqrt(advantages[real].var() + 1e-8)
  return whitened * mask, advantages + e["values"]


def _reference_policy_loss(logprobs, old_logprobs, advantages, mask, settings):
  ratio = np.exp(logprobs - old_logprobs)
  clipped = np.clip(ratio, 1 - settings.clip_eps, 1 + settings.clip_eps)
  terms = np.maximum(-advantages * ratio, -advantages * clipped)
  return (terms * mask).sum() / mask.sum()


def _reference_value_loss(values, old_values, returns, mask, settings):
  eps = settings.value_clip_eps
  clipped = old_values + np.clip(values - old_values, -eps, eps)
  terms = 0.5 * np.maximum((values - returns) ** 2, (clipped - returns) ** 2)
  return (terms * mask).sum() / mask.sum()


def test_torch_ppo_advantages_follow_the_settings():
  e = _episodes()
  expected = _reference_advantages(e, SETTINGS)
  # The inputs are ones where the settings matter (the comparison below could not pass
  # with the defaults hard-coded).
  assert not np.allclose(expected[0], _reference_advantages(e, DEFAULTS)[0], atol=1e-3)
  t = lambda name: torch.from_numpy(e[name])
  advantages, returns = torch_sections.advantages_and_returns(
      t("logprobs"), t("ref_logprobs"), t("values"), t("scores"), t("stopped"), t("mask"),
      kl_coef=KL_COEF, settings=SETTINGS)
  np.testing.assert_allclose(advantages.numpy() * e["mask"], expected[0], atol=1e-5)
  np.testing.assert_allclose(returns.numpy(), expected[1], atol=1e-5)


def test_torch_ppo_losses_follow_the_settings():
  e = _episodes(seed=1)
  rng = np.random.default_rng(2)
  # Ratios within about e^{+-0.6} and values within about 0.4 of the old ones: both clips
  # bind at the settings' ranges and at the defaults' differently.
  noise = lambda scale: (rng.normal(size=(4, 5)) * scale * e["mask"]).astype(np.float32)
  old_logprobs, old_values = e["logprobs"] + noise(0.3), e["values"] + noise(0.2)
  policy_args = (e["logprobs"], old_logprobs, e["advantages"], e["mask"])
  value_args = (e["values"], old_values, e["returns"], e["mask"])
  for reference, torch_fn, args in (
      (_reference_policy_loss, torch_sections.policy_loss, policy_args),
      (_reference_value_loss, torch_sections.value_loss, value_args)):
    expected = reference(*args, SETTINGS)
    assert not np.isclose(expected, reference(*args, DEFAULTS), atol=1e-4), torch_fn
    got = torch_fn(*(torch.from_numpy(x) for x in args), SETTINGS).item()
    np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=torch_fn.__name__)


def test_torch_ppo_logprobs_sampling_and_minibatches_follow_the_settings():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  scaled = logits / SETTINGS.temperature
  log_softmax = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
  expected = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
  got = torch_sections.token_logprobs(torch.from_numpy(logits), torch.from_numpy(targets),
                                      SETTINGS)
  np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)

  assert torch_sections.sampling_options(SETTINGS) == dict(
      max_new_tokens=5, temperature=0.7, top_k=3, top_p=0.9, eos_token_id=7,
      pad_token_id=1)

  rows = torch_sections.minibatch_rows(8, SETTINGS)  # 3 epochs x 2 minibatches of 4
  assert [len(r) for r in rows] == [4] * 6
  for epoch in range(3):
    assert sorted(torch.cat(rows[2 * epoch:2 * epoch + 2]).tolist()) == list(range(8))


def test_torch_ppo_refuses_settings_it_does_not_implement():
  torch_sections.check_ppo_settings(SETTINGS)
  with pytest.raises(ValueError, match="ptx_coef"):
    torch_sections.check_ppo_settings(dataclasses.replace(SETTINGS, ptx_coef=0.5))
  with pytest.raises(ValueError, match="kl_controller"):
    torch_sections.check_ppo_settings(dataclasses.replace(
        SETTINGS, kl_controller="adaptive", kl_target=1.0, kl_horizon=10.0))
