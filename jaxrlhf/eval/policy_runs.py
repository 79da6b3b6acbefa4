"""One policy's part in the comparison: its answers to every prompt and what is measured.

`answer_prompts` samples one answer per prompt into a `PolicyRun`; `measure` adds the KL
from the reference policy on those samples, the reward model's scores and the held-out
text NLL. `jaxrlhf.eval.judging` then judges the runs against the baseline's.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import numpy as np

from jaxrlhf import config_lib
from jaxrlhf import models
from jaxrlhf import policy_lib
from jaxrlhf import scoring
from jaxrlhf.eval import generation as generation_lib


@dataclasses.dataclass
class PolicyRun:
  """One policy's answer to every prompt, with what `measure` fills in."""
  name: str
  path: str
  few_shot: bool
  texts: list[str]
  stopped: np.ndarray            # [N] bool
  lengths: np.ndarray            # [N] response tokens, stop token included
  response_ids: np.ndarray       # [N, R]
  response_mask: np.ndarray      # [N, R]
  kl: np.ndarray | None = None   # [N] sum over tokens of log pi - log pi_ref (k1)
  rm_scores: np.ndarray | None = None  # [N]
  pretrain_nll: float | None = None


def load_causal_lm(path: str):
  """(model, params) of a policy checkpoint; a reward model (score head) is refused."""
  model, params = models.from_pretrained(path)
  if not isinstance(model, models.CausalLM):
    raise config_lib.ConfigError(f"{path}: a policy must be a causal LM; this checkpoint has a score "
                     "head (a reward model?)")
  return model, params


def answer_prompts(name, path, model, rparams, *, programs: generation_lib.Programs,
                   tokenizer, encoder, prompt_arrays, per_device: int, seed: int,
                   few_shot: bool = False) -> PolicyRun:
  """Samples one answer per prompt from replicated `rparams`."""
  rng = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
  ids, mask, stopped = generation_lib.run_batched(programs.sample(model), rparams,
                                                  prompt_arrays, per_device, rng)
  texts = policy_lib.decode_responses(tokenizer, ids, mask, stopped, encoder.eos_id)
  return PolicyRun(name=name, path=path, few_shot=few_shot, texts=texts,
                   stopped=np.asarray(stopped, bool), lengths=mask.sum(axis=1),
                   response_ids=ids, response_mask=mask)


def measure(run: PolicyRun, model, rparams, *, programs: generation_lib.Programs,
            judge_prompts: dict, per_device: int, reference: tuple | None,
            reward: tuple | None, text_batches_: list[dict] | None) -> None:
  """Fills KL from the reference, RM scores and held-out text NLL into `run`."""
  arrays = dict(judge_prompts, response_ids=run.response_ids,
                response_mask=run.response_mask)
  if reference is not None and not run.few_shot:
    ref_model, ref_rparams = reference
    logprob = generation_lib.run_batched(programs.logprob(model), rparams, arrays,
                                         per_device)
    ref_logprob = generation_lib.run_batched(programs.logprob(ref_model), ref_rparams,
                                             arrays, per_device)
    run.kl = logprob - ref_logprob
  if reward is not None:
    rm_model, rm_rparams = reward
    run.rm_scores = generation_lib.run_batched(programs.score(rm_model), rm_rparams, arrays,
                                               per_device)
  if text_batches_:
    run.pretrain_nll = scoring.evaluate_nll(programs.nll(model), rparams,
                                            text_batches_)["eval_loss"]
