"""What both frameworks' measurements share: timing, memory, FLOPs, inputs and settings.

`report.run(config)` builds random-weight models of one shape, times jaxrlhf's compiled
steps (jax_sections.py) and, when torch is installed, transformers' PyTorch models of the
same shape doing the same work (torch_sections.py), in the same process on the same host.

Timing. Every figure is the median wall time of `repeats` calls after `warmup` calls,
each call waited on (`block_until_ready`). Compile time is the first call's wall time
minus that median (so it includes tracing and, with a warm persistent cache, only the
cache read). Peak host memory is the largest resident set size seen while a
measurement ran (sampled every 20 ms from /proc), for the whole process: both
frameworks' models live in it, so read differences between rows, not absolutes.

FLOP accounting (what MFU divides by the measured matmul peak):
  N = the parameters that take part in a matmul per token: every q/k/v/o and MLP
    kernel, plus the output projection (hidden x vocab, tied or not) for a language
    model or the hidden x 1 score head for a scalar model. Embedding look-ups, norms
    and biases are not counted (they are not matmuls).
  Training, per token of a [batch, T] sequence: 6 N (forward 2 N, backward 4 N) plus
    attention 12 L H d T (forward QK^T and PV are 2 T H d multiply-adds each, per layer;
    the backward pass doubles that; the full T x T product is computed, so the causal
    half is counted too), with L layers, H query heads, head dimension d.
  Generation, per new token: 2 N plus attention 4 L H d C, with C the cache slots the
    token attends over (the sampler reads the whole fixed-size cache: C = prompt +
    new tokens). The prompt prefill is counted the same way per prompt token.
  Scoring a PPO rollout: 2 N + 4 L H d T per token for each forward (policy, reference,
    value, reward). PPO update: training FLOPs of policy and value on each minibatch of
    every epoch.
  Peak: the best of a few float32 [n, n] @ [n, n] matmuls through jax (and through
    torch, when installed), 2 n^3 FLOPs each; MFU = achieved FLOP/s / that peak.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrlhf import model_lib
from jaxrlhf import models
from jaxrlhf import optim
from jaxrlhf import ppo


# ---------------------------------------------------------------------------------------
# Timing and memory.
# ---------------------------------------------------------------------------------------


class PeakRss:
  """Largest resident set size of this process while the `with` block runs, in bytes."""

  def __init__(self, interval_s: float = 0.02):
    self.interval_s = interval_s
    self.peak = 0
    self._stop = threading.Event()
    self._thread = None

  @staticmethod
  def current() -> int:
    try:
      with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: the lifetime peak is the best we have
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

  def _poll(self):
    while not self._stop.wait(self.interval_s):
      self.peak = max(self.peak, self.current())

  def __enter__(self):
    self.peak = self.current()
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.current())
    return False


def block(tree):
  """Waits for every jax array in `tree`; returns it."""
  return jax.tree_util.tree_map(
      lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def time_calls(call: Callable[[], Any], *, warmup: int, repeats: int) -> dict:
  """Times `call()` (which must wait for its own result): first call, then the median.

  Returns {"first_s", "median_s", "times_s", "compile_s", "peak_rss_bytes"}.
  """
  gc.collect()
  with PeakRss() as rss:
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(warmup):
      call()
    times = []
    for _ in range(max(repeats, 1)):
      t0 = time.perf_counter()
      call()
      times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {"first_s": first, "median_s": median, "times_s": times,
          "compile_s": max(first - median, 0.0), "peak_rss_bytes": rss.peak}


def throughput(timing: dict, units: float, flops: float, peak: float) -> dict:
  """A timing with its rate of `units`, its FLOP/s and its MFU against `peak`."""
  seconds = timing["median_s"]
  return {**timing, "units": units, "units_per_s": units / seconds,
          "flops": flops, "flops_per_s": flops / seconds,
          "mfu": flops / seconds / peak}


# ---------------------------------------------------------------------------------------
# FLOPs and the matmul peak.
# ---------------------------------------------------------------------------------------


def matmul_params(config: models.TransformerConfig, head: str = "lm") -> int:
  """N of the module docstring: matmul parameters used per token."""
  hidden, hd = config.hidden_size, config.head_dim
  attention = hidden * hd * (2 * config.num_heads + 2 * config.num_kv_heads)
  mlp = hidden * config.intermediate_size * (3 if config.spec.gated_mlp else 2)
  out = hidden * config.vocab_size if head == "lm" else hidden
  return config.num_layers * (attention + mlp) + out


def attention_flops(config: models.TransformerConfig, context: int) -> int:
  """Forward attention FLOPs per query token over `context` keys (QK^T and PV)."""
  return 4 * config.num_layers * config.num_heads * config.head_dim * context


def train_flops_per_token(config, seq_len: int, head: str = "lm") -> int:
  return 6 * matmul_params(config, head) + 3 * attention_flops(config, seq_len)


def forward_flops_per_token(config, context: int, head: str = "lm") -> int:
  return 2 * matmul_params(config, head) + attention_flops(config, context)


def sampling_flops(mcfg, batch, prompt_len, new_tokens) -> float:
  context = prompt_len + new_tokens
  return float(batch * (prompt_len + new_tokens) * forward_flops_per_token(mcfg, context))


def ppo_flops(config, mcfg, settings: ppo.PPOSettings) -> dict:
  """FLOPs of one PPO iteration's parts: rollout, scoring and update."""
  batch, prompt_len, new = config.ppo_batch_size, config.prompt_len, settings.max_new_tokens
  seq = prompt_len + new
  forward = lambda head: batch * seq * forward_flops_per_token(mcfg, seq, head)
  train = lambda head: batch * seq * train_flops_per_token(mcfg, seq, head)
  return {"rollout": sampling_flops(mcfg, batch, prompt_len, new),
          "scoring": float(2 * forward("lm") + 2 * forward("scalar")),
          "update": float(settings.num_epochs * (train("lm") + train("scalar")))}


def maybe_torch():
  """The torch module, or None where it is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch


def measure_matmul_peak(size: int, repeats: int = 5, dtype: str = "float32",
                        torch_device: str = "cpu") -> dict:
  """Best [size, size] matmul FLOP/s in `dtype` through jax (its default device), and
  through torch on `torch_device` when torch is installed."""
  flops = 2 * size**3
  out = {"size": size, "dtype": dtype}
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.matmul)
  timing = time_calls(lambda: matmul(a, b).block_until_ready(), warmup=1, repeats=repeats)
  out["jax_flops_per_s"] = flops / min(timing["times_s"])
  torch = maybe_torch()
  if torch is not None:
    device = torch_device_of(torch_device)
    ta = torch.from_numpy(np.array(a, np.float32)).to(device, getattr(torch, dtype))
    tb = torch.from_numpy(np.array(b, np.float32)).to(device, getattr(torch, dtype))

    def call():
      torch.matmul(ta, tb)
      if device.type == "cuda":
        torch.cuda.synchronize()
    timing = time_calls(call, warmup=1, repeats=repeats)
    out["torch_flops_per_s"] = flops / min(timing["times_s"])
  out["peak_flops_per_s"] = max(v for k, v in out.items() if k.endswith("_flops_per_s"))
  return out


# ---------------------------------------------------------------------------------------
# Settings both frameworks are built from.
# ---------------------------------------------------------------------------------------


def torch_device_of(name: str):
  """'cpu', 'cuda', or 'auto' (cuda when torch sees a GPU) as a torch.device."""
  torch = maybe_torch()
  if name == "auto":
    name = "cuda" if torch.cuda.is_available() else "cpu"
  return torch.device(name)


def model_config(config: ml_collections.ConfigDict) -> models.TransformerConfig:
  fields = dict(config.model)
  arch = fields.pop("arch")
  # Random weights and random tokens: no special tokens, so nothing stops early. The
  # parameters stay float32 (the master copy); `dtype` is the compute dtype.
  return models.TransformerConfig.for_arch(
      arch, **fields, pad_token_id=0,
      dtype=model_lib.dtype_from_name(config.get("dtype", "float32")))


def compiled_memory(fn, *args) -> dict | None:
  """The compiled program's own memory analysis (bytes per device), for a pmapped or
  jitted `fn` on `args`; None where the backend gives none."""
  try:
    analysis = fn.lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  out = {name: int(getattr(analysis, f"{name}_size_in_bytes"))
         for name in ("argument", "output", "temp", "alias")}
  out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def device_memory() -> dict | None:
  """The first jax device's allocator figures (peak since the process started, and now);
  None on backends without them (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats:
    return None
  return {"peak_bytes_in_use": int(stats.get("peak_bytes_in_use", 0)),
          "bytes_in_use": int(stats.get("bytes_in_use", 0))}


def optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """jaxrlhf's optimizer section (AdamW); the PyTorch AdamW reads the same fields."""
  cfg = optim.default_optimizer_config()
  cfg.name = "adamw"
  cfg.learning_rate = config.learning_rate
  cfg.weight_decay = config.weight_decay
  return cfg


def ppo_settings(config: ml_collections.ConfigDict, mcfg) -> ppo.PPOSettings:
  """jaxrlhf's static PPO settings for one iteration, handed to both frameworks' PPO.

  Clips, GAE, sampling and the penalty score are PPOSettings' defaults. The last token id
  stands in for the stop token, so responses are cut after it as in training (random
  weights seldom emit it). The KL coefficient is not a static setting (jaxrlhf keeps it
  in the state's KL controller): both frameworks read `config.ppo_kl_coef`.
  """
  return ppo.PPOSettings(
      max_new_tokens=config.new_tokens, stop_token_id=mcfg.vocab_size - 1, pad_token_id=0,
      num_epochs=1, num_minibatches=config.ppo_batch_size // config.ppo_minibatch_size,
      episodes_per_iteration=config.ppo_batch_size)


# ---------------------------------------------------------------------------------------
# Inputs (the same token ids feed both frameworks).
# ---------------------------------------------------------------------------------------


def lm_batch(config, batch: int, seq_len: int, seed: int = 0) -> dict:
  """Full sequences; the loss on every token but the first (pretraining-style)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, config.vocab_size, size=(batch, seq_len)).astype(np.int32)
  ones = np.ones((batch, seq_len), np.int32)
  return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def ranking_batch(config, batch: int, k: int, seq_len: int, seed: int = 1) -> dict:
  """K full-length responses per prompt, strictly ranked: C(K, 2) comparisons each."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, config.vocab_size, size=(batch, k, seq_len)).astype(np.int32)
  pair_mask = np.triu(np.ones((k, k), np.float32), 1)  # response i beats every j > i
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "end_index": np.full((batch, k), seq_len - 1, np.int32),
          "pair_mask": np.broadcast_to(pair_mask, (batch, k, k)).copy()}


def prompt_batch(config, batch: int, prompt_len: int, seed: int = 2) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
  return {"prompt_ids": ids, "prompt_mask": np.ones_like(ids)}
