"""Sampling a policy on host prompt lists, batched over every device.

Used to build the world's reward-model rankings, to log samples, and by evaluation. The
same `sampling.sample` the PPO rollout uses, pmapped once per (model, settings).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jaxrlhf import parallel
from jaxrlhf import sampling
from jaxrlhf.data import buckets
from jaxrlhf.data import formats
from jaxrlhf.data import tokenize as tokenize_lib


@dataclasses.dataclass
class Samples:
  texts: list[str]          # decoded responses, stop token and padding removed
  stopped: list[bool]       # the response emitted the stop token
  lengths: list[int]        # response tokens including the stop token


def encode_prompts(prompts: list, encoder: tokenize_lib.Encoder, max_prompt_len: int,
                   length_bucket: int = 0, *, across_processes: bool = False
                   ) -> dict[str, np.ndarray]:
  """Left-padded prompt_ids / prompt_mask [len(prompts), max_prompt_len] for the sampler,
  from strings or parsed `formats.Prompt`s (chats, TL;DR posts: see tokenize_prompt).
  `length_bucket` > 0 cuts the columns to the smallest multiple of it that holds the
  longest prompt (data/buckets.py): one shape for the whole list (and, with
  `across_processes`, for every process's list)."""
  lengths = tokenize_lib.Lengths(prompt=max_prompt_len, response=1)
  rows = [tokenize_lib.tokenize_prompt(formats.Prompt(p) if isinstance(p, str) else p,
                                       encoder, lengths) for p in prompts]
  encoded = {k: np.stack([r[k] for r in rows]) for k in ("prompt_ids", "prompt_mask")}
  if length_bucket > 0 and rows:
    need = [int(encoded["prompt_mask"].sum(axis=-1).max())]
    if across_processes:
      need = buckets.agree(need)
    encoded = buckets.cut("prompts", encoded,
                          (buckets.round_up(need[0], max_prompt_len, length_bucket),))
  return encoded


def decode_responses(tokenizer, response_ids, response_mask, stopped, eos_id: int
                     ) -> list[str]:
  """Response texts without padding and without the stop token that ended them."""
  texts = []
  for row, mask, stop in zip(response_ids, response_mask, stopped):
    body = np.asarray(row)[np.asarray(mask) > 0].tolist()
    if stop and body and body[-1] == eos_id:
      body = body[:-1]
    texts.append(tokenizer.decode(body, skip_special_tokens=True).strip())
  return texts


class Sampler:
  """Samples responses to lists of prompt strings with one compiled program."""

  def __init__(self, model, tokenizer, *, max_prompt_len: int, max_new_tokens: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               greedy: bool = False, per_device_batch: int = 32, devices=None,
               length_bucket: int = 0):
    """`devices`: e.g. jax.local_devices() to sample on one process of a multi-process
    run alone; by default every process must call `sample` together.
    `length_bucket` > 0: each `sample` call cuts the prompts' left padding to the
    smallest multiple of it that holds the call's longest prompt (data/buckets.py)."""
    self.length_bucket = length_bucket
    self.tokenizer = tokenizer
    self.encoder = tokenize_lib.Encoder(tokenizer)
    self.lengths = tokenize_lib.Lengths(prompt=max_prompt_len, response=max_new_tokens)
    self.per_device_batch = per_device_batch
    fn = functools.partial(
        sampling.sample, model, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, greedy=greedy, stop_token_id=self.encoder.eos_id,
        pad_token_id=self.encoder.pad_id)

    def _sample(params, prompt_ids, prompt_mask, rng):
      out = parallel.per_device(lambda key, ids, mask: fn(params, ids, mask, key), rng,
                                prompt_ids, prompt_mask)
      return out.response_ids, out.response_mask, out.stopped

    self._num_devices = len(devices) if devices else None
    self._sample_p = parallel.pmap_fn(_sample, in_axes=(0, 0, 0, None), devices=devices)

  def sample(self, rparams, prompts: list[str], rng: jax.Array) -> Samples:
    """Responses to `prompts` under replicated params `rparams`."""
    n_dev = self._num_devices or jax.local_device_count()
    chunk = n_dev * self.per_device_batch
    texts, stopped, lengths = [], [], []
    # One shape for the whole call; on every process when all of them sample together.
    encoded = encode_prompts(prompts, self.encoder, self.lengths.prompt, self.length_bucket,
                             across_processes=self._num_devices is None) if prompts else None
    for start in range(0, len(prompts), chunk):
      part = {k: v[start:start + chunk] for k, v in encoded.items()}
      n = len(part["prompt_ids"])
      # Fixed shapes, one compile: the last chunk repeats its last prompt.
      part = {k: np.concatenate([v, np.repeat(v[-1:], chunk - n, axis=0)])
              for k, v in part.items()}
      enc = parallel.shard(part, n_dev)
      if self._num_devices is None:  # the stage's layout; else pmapped on `devices`
        enc = parallel.device_put_sharded(enc)
      ids, mask, stop = parallel.unshard(self._sample_p(
          rparams, enc["prompt_ids"], enc["prompt_mask"],
          jax.random.fold_in(rng, start)))
      ids = np.asarray(ids).reshape(chunk, -1)[:n]
      mask = np.asarray(mask).reshape(chunk, -1)[:n]
      stop = np.asarray(stop).reshape(chunk)[:n]
      texts.extend(decode_responses(self.tokenizer, ids, mask, stop, self.encoder.eos_id))
      stopped.extend(bool(s) for s in stop)
      lengths.extend(int(m.sum()) for m in mask)
    return Samples(texts, stopped, lengths)
