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
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import time
import zlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import losses
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import policy_lib
from jaxrlhf import sampling
from jaxrlhf import scoring
from jaxrlhf import train_lib
from jaxrlhf.data import formats
from jaxrlhf.data import tokenize as tokenize_lib
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.data.world import tasks as tasks_lib
from jaxrlhf.data.world import world as world_lib

# Splits of the embedded world whose prompts come from held-out (test) users.
WORLD_TEST_PROMPTS = ("ppo/test", "rm/test", "sft/test")
Z_95 = 1.959963984540054


# ---------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------


def win_rate(outcomes) -> dict:
  """Mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss) with its 95% normal interval."""
  outcomes = np.asarray(outcomes, np.float64)
  n = len(outcomes)
  if n == 0:
    raise ValueError("win_rate of no outcomes")
  mean = float(outcomes.mean())
  half = Z_95 * float(outcomes.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
  return {"win_rate": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
          "wins": int(np.sum(outcomes == 1.0)), "ties": int(np.sum(outcomes == 0.5)),
          "losses": int(np.sum(outcomes == 0.0)), "n": n}


def score_outcomes(scores, baseline_scores) -> np.ndarray:
  """1 / 0.5 / 0 where the policy's score is above / equal to / below the baseline's."""
  scores, baseline_scores = np.asarray(scores), np.asarray(baseline_scores)
  return np.where(scores > baseline_scores, 1.0, np.where(scores == baseline_scores, 0.5, 0.0))


# ---------------------------------------------------------------------------------------
# Pure functions, pmapped once per model shape.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
  """How every policy samples; the same for all, so they are judged on equal terms."""
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  greedy: bool
  stop_token_id: int
  pad_token_id: int


def sample_responses(params, prompt_ids, prompt_mask, rng, *, model, generation: Generation):
  """(response_ids, response_mask, stopped), cut after the first stop token."""
  out = sampling.sample(
      model, params, prompt_ids, prompt_mask, parallel.device_rng(rng),
      max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
      top_k=generation.top_k, top_p=generation.top_p, greedy=generation.greedy,
      stop_token_id=generation.stop_token_id, pad_token_id=generation.pad_token_id)
  return scoring.truncate_after_stop(out.response_ids, generation.stop_token_id,
                                 generation.pad_token_id)


def response_logprob(params, prompt_ids, prompt_mask, response_ids, response_mask, *,
                     apply_fn, temperature: float):
  """Sum over response tokens of log pi(token | prefix), at the sampling temperature. [B]"""
  sequences, attention_mask = scoring.join_prompt_response(prompt_ids, prompt_mask,
                                                       response_ids, response_mask)
  logits = scoring.response_logits(apply_fn, params, sequences, attention_mask,
                               prompt_ids.shape[1])
  logprobs = losses.token_logprobs(logits, response_ids, temperature)
  return jnp.sum(logprobs * response_mask, axis=-1)


class Programs:
  """Compiled functions, shared by every checkpoint of the same model config."""

  def __init__(self, generation: Generation):
    self.generation = generation
    self._cache: dict = {}

  def _get(self, kind: str, model, build):
    key = (kind, type(model).__name__, model.config)
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def sample(self, model):
    return self._get("sample", model, lambda: parallel.pmap_fn(
        functools.partial(sample_responses, model=model, generation=self.generation),
        in_axes=(0, 0, 0, None)))

  def logprob(self, model):
    return self._get("logprob", model, lambda: parallel.pmap_fn(functools.partial(
        response_logprob, apply_fn=model.apply, temperature=self.generation.temperature)))

  def score(self, model):
    return self._get("score", model, lambda: parallel.pmap_fn(
        functools.partial(scoring.response_scores, apply_fn=model.apply)))

  def nll(self, model):
    return self._get("nll", model, lambda: parallel.pmap_fn(
        functools.partial(scoring.lm_eval_step, apply_fn=model.apply)))


def run_batched(fn, rparams, arrays: dict[str, np.ndarray], per_device: int,
                *extra) -> Any:
  """Calls pmapped fn(rparams, *arrays.values(), *extra) over fixed-size chunks of rows.

  The last chunk is padded by repeating its last row (one compiled shape); outputs are
  trimmed back and concatenated along the row axis.
  """
  n_dev = jax.local_device_count()
  chunk = n_dev * per_device
  total = len(next(iter(arrays.values())))
  outputs = []
  for start in range(0, total, chunk):
    part = {k: v[start:start + chunk] for k, v in arrays.items()}
    real = len(next(iter(part.values())))
    padded = {k: np.concatenate([v, np.repeat(v[-1:], chunk - real, axis=0)])
              for k, v in part.items()}
    device_args = [train_lib.put_batch(parallel.shard(v)) for v in padded.values()]
    extra_args = [jax.random.fold_in(e, start) if isinstance(e, jax.Array) else e
                  for e in extra]
    out = jax.device_get(fn(rparams, *device_args, *extra_args))
    outputs.append(jax.tree_util.tree_map(
        lambda x, real=real: np.asarray(x).reshape((chunk,) + np.asarray(x).shape[2:])[:real],
        out))
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outputs)


# ---------------------------------------------------------------------------------------
# Inputs: prompts, few-shot prompts, held-out text.
# ---------------------------------------------------------------------------------------


def _split_list(value: str) -> list[str]:
  return [part.strip() for part in str(value or "").split(",") if part.strip()]


def parse_policies(spec: str) -> dict[str, str]:
  """'name=path,name=path' -> {name: path}, in order; names must be unique."""
  policies = {}
  for item in _split_list(spec):
    name, sep, path = item.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
      raise ValueError(f"config.policies: {item!r} is not name=path")
    if name in policies:
      raise ValueError(f"config.policies: the name {name!r} appears twice")
    policies[name] = path
  return policies


def prompt_files(config: ml_collections.ConfigDict) -> list[str]:
  """The prompt files: config.prompts_file, or the world's held-out test prompts."""
  if config.prompts_file:
    return formats.expand_paths(_split_list(config.prompts_file))
  directory = epath.Path(config.world_dir)
  if not (directory / "world.json").exists():
    raise FileNotFoundError(
        f"config.world_dir={config.world_dir!r} holds no world.json; set "
        "config.prompts_file to a prompts JSONL or config.world_dir to a world written by "
        "the pipeline (<workdir>/world).")
  return [str(directory / f"{name}.jsonl") for name in WORLD_TEST_PROMPTS]


def read_prompts(files: list[str], *, need_meta: bool, limit: int = 0
                 ) -> list[formats.Prompt]:
  """Prompts (with their host-side meta); the labeler needs each prompt's task fields."""
  prompts = []
  for path in files:
    prompts.extend(formats.iter_file("prompts", path))
  if limit:
    prompts = prompts[:limit]
  if not prompts:
    raise ValueError(f"no prompts in {files}")
  if need_meta:
    for prompt in prompts:
      meta = prompt.meta or {}
      for field in ("task", "items"):
        if field not in meta:
          raise formats.DataError(
              f"the labeler judges by the world's task fields, and {field!r} is missing "
              "(use config.judge='reward_model' for prompts without them)",
              source=prompt.source, field=field, reason="missing_field")
  return prompts


def few_shot_prefix(demonstrations: list[formats.Demonstration], num_shots: int,
                    eos_token: str, seed: int) -> str:
  """`num_shots` demonstrations as "prompt response <eos>" blocks, chosen with a seed.

  Like the paper's prompted GPT-3 baseline: the base model never saw the instruction
  format, so it is shown a few examples of it, each closed by the stop token so it can
  learn in context where an answer ends.
  """
  candidates = [d for d in demonstrations if not d.is_chat]
  if len(candidates) < num_shots:
    raise ValueError(f"few-shot: {num_shots} examples wanted, {len(candidates)} available")
  order = np.random.default_rng(seed).permutation(len(candidates))[:num_shots]
  return " ".join(f"{candidates[i].prompt} {candidates[i].response} {eos_token}"
                  for i in order)


def text_batches(path: str, tokenizer, max_len: int, per_device: int, limit: int
                 ) -> list[dict]:
  """Held-out pretraining text as host batches [devices, per_device, T]."""
  texts = formats.read_examples("text", path)
  lengths = tokenize_lib.Lengths(prompt=2, response=1, text=max_len)
  from jaxrlhf import data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.eval_loader_batches("text", texts, tokenizer, lengths, per_device,
                                      limit)()


# ---------------------------------------------------------------------------------------
# One policy's answers and measurements.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class PolicyRun:
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
  model, params = models.from_pretrained(path)
  if not isinstance(model, models.CausalLM):
    raise ValueError(f"{path}: a policy must be a causal LM; this checkpoint has a score "
                     "head (a reward model?)")
  return model, params


def answer_prompts(name, path, model, rparams, *, programs: Programs, tokenizer, encoder,
                   prompt_arrays, per_device: int, seed: int, few_shot: bool = False
                   ) -> PolicyRun:
  """Samples one answer per prompt from replicated `rparams`."""
  rng = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
  ids, mask, stopped = run_batched(programs.sample(model), rparams, prompt_arrays,
                                   per_device, rng)
  texts = policy_lib.decode_responses(tokenizer, ids, mask, stopped, encoder.eos_id)
  return PolicyRun(name=name, path=path, few_shot=few_shot, texts=texts,
                   stopped=np.asarray(stopped, bool), lengths=mask.sum(axis=1),
                   response_ids=ids, response_mask=mask)


def measure(run: PolicyRun, model, rparams, *, programs: Programs, judge_prompts: dict,
            per_device: int, reference: tuple | None, reward: tuple | None,
            text_batches_: list[dict] | None) -> None:
  """Fills KL from the reference, RM scores and held-out text NLL into `run`."""
  arrays = dict(judge_prompts, response_ids=run.response_ids,
                response_mask=run.response_mask)
  if reference is not None and not run.few_shot:
    ref_model, ref_rparams = reference
    logprob = run_batched(programs.logprob(model), rparams, arrays, per_device)
    ref_logprob = run_batched(programs.logprob(ref_model), ref_rparams, arrays, per_device)
    run.kl = logprob - ref_logprob
  if reward is not None:
    rm_model, rm_rparams = reward
    run.rm_scores = run_batched(programs.score(rm_model), rm_rparams, arrays, per_device)
  if text_batches_:
    run.pretrain_nll = scoring.evaluate_nll(programs.nll(model), rparams,
                                        text_batches_)["eval_loss"]


# ---------------------------------------------------------------------------------------
# Judging.
# ---------------------------------------------------------------------------------------


def labeler_outcomes(labeler: labeler_lib.Labeler, metas: list[dict], run: PolicyRun,
                     baseline: PolicyRun, seed: int) -> np.ndarray:
  """One labeler judgement per prompt: 1 the policy's answer is rated higher, 0.5 tie."""
  return judge_answers(labeler, metas, run.name, run.texts, run.stopped, baseline, seed)


def judge_answers(labeler: labeler_lib.Labeler, metas: list[dict], name: str,
                  texts: list[str], stopped, baseline: PolicyRun, seed: int) -> np.ndarray:
  """`labeler_outcomes` of answers that need not come from a policy run (noise keyed
  by `name`)."""
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  return np.array([
      labeler.prefer(meta, a, b, rng, bool(sa), bool(sb))
      for meta, a, b, sa, sb in zip(metas, texts, baseline.texts, stopped,
                                    baseline.stopped)])


def best_of_n_kl(n: int) -> float:
  """KL (nats) of best-of-n sampling from the policy it draws from: log n - (n-1)/n."""
  return math.log(n) - (n - 1) / n


def best_of_n(candidates: list[PolicyRun], metas: list[dict], labeler: labeler_lib.Labeler,
              baseline: PolicyRun, seed: int) -> dict:
  """Win rates against `baseline` of the best of the first n candidate answers per prompt,
  for n = 1, 2, 4, ... up to len(candidates), picked by the reward model (candidates'
  `rm_scores`, when present) and by the labeler's noiseless quality (what a perfect
  reward model would pick). Each candidate is one independent answer to every prompt.
  Both pickers' choices at one n are judged with the same labeler noise, so where they
  pick the same answer they get the same verdict.

  The reward model's picks should win more often as n grows; where they stop improving
  (or get worse while the labeler's keep improving), optimising that reward model further
  (PPO, a larger KL budget) cannot help: Gao et al.'s over-optimisation, measured.
  """
  if not candidates:
    raise ValueError("best_of_n needs at least one candidate answer per prompt")
  texts = [[c.texts[i] for c in candidates] for i in range(len(metas))]
  stopped = [[bool(c.stopped[i]) for c in candidates] for i in range(len(metas))]
  terms = [[labeler_lib.quality_terms(meta, t, s) for t, s in zip(row, row_stopped)]
           for meta, row, row_stopped in zip(metas, texts, stopped)]
  latent = np.array([[labeler_lib.weighted_quality(t) for t in row] for row in terms])
  pickers = {"labeler": latent}
  if all(c.rm_scores is not None for c in candidates):
    pickers["reward_model"] = np.stack([c.rm_scores for c in candidates], axis=1)
  sizes = [2 ** i for i in range(int(math.log2(len(candidates))) + 1)]
  out = {"n": sizes, "kl_bound": [best_of_n_kl(n) for n in sizes]}
  for picker, values in pickers.items():
    rows = []
    for n in sizes:
      pick = np.argmax(values[:, :n], axis=1)  # first of equal bests
      chosen_texts = [texts[i][j] for i, j in enumerate(pick)]
      chosen_stopped = [stopped[i][j] for i, j in enumerate(pick)]
      outcome = win_rate(judge_answers(labeler, metas, f"best_of_{n}", chosen_texts,
                                       chosen_stopped, baseline, seed))
      rows.append({"win_rate": outcome["win_rate"], "ci95": outcome["ci95"],
                   "correct": float(np.mean([terms[i][j]["correct"]
                                             for i, j in enumerate(pick)]))})
    out[picker] = rows
  return out


def reference_answers(metas: list[dict], labeler: labeler_lib.Labeler, baseline: PolicyRun,
                      seed: int) -> dict:
  """Win rates against `baseline` of two fixed answers that bound what a policy can gain:
  the right answer, stopped, with nothing extra (`right_answer`), and the baseline's own
  answers cut after their leading answer symbols and stopped (`baseline_without_extra`:
  all a policy wins by only dropping filler and stopping)."""
  right = [" ".join(tasks_lib.answer(meta)) for meta in metas]
  trimmed = [" ".join(labeler_lib.answer_words(t, bool(s)))
             for t, s in zip(baseline.texts, baseline.stopped)]
  stopped = [True] * len(metas)
  return {name: win_rate(judge_answers(labeler, metas, name, texts, stopped, baseline, seed))
          for name, texts in (("right_answer", right), ("baseline_without_extra", trimmed))}


def exact_correct(meta: dict, response: str, stopped: bool) -> bool:
  """The answer the labeler reads off the response is exactly right."""
  words = labeler_lib.answer_words(response, stopped)
  return bool(words) and tasks_lib.correctness(meta, words) == 1.0


def task_table(metas: list[dict], run: PolicyRun) -> dict:
  """Mean Likert rating (the labeler's, without rating noise) and exact correctness,
  overall and per instruction type, and the mean of each term of the labeler's latent
  quality (where a policy's wins come from: right answers, or only shorter ones)."""
  terms = [labeler_lib.quality_terms(m, t, bool(s))
           for m, t, s in zip(metas, run.texts, run.stopped)]
  likert = np.array([labeler_lib.score_from_terms(t) for t in terms], np.float64)
  # Exactly right is full correctness credit (a response with no answer gets 0).
  correct = np.array([t["correct"] == 1.0 for t in terms], np.float64)
  tasks = np.array([m["task"] for m in metas])
  per_task = {}
  for task in sorted(set(tasks.tolist())):
    rows = tasks == task
    per_task[task] = {"likert": float(likert[rows].mean()),
                      "exact_correct": float(correct[rows].mean()), "n": int(rows.sum())}
  return {"likert": float(likert.mean()), "exact_correct": float(correct.mean()),
          "quality_terms": {name: float(np.mean([t[name] for t in terms]))
                            for name in labeler_lib.WEIGHTS},
          "per_task": per_task}


# Which of the labeler's terms tell two responses apart: `content` = only what the answer
# says (correct, constraint), `form` = only how it ends (stopped, concise), `both`.
PAIR_DIFFERENCES = ("content", "form", "both")
_CONTENT_TERMS = frozenset({"correct", "constraint"})


def pair_difference(terms_a: dict[str, float], terms_b: dict[str, float]) -> str:
  """`PAIR_DIFFERENCES` entry for two responses' `labeler.quality_terms` (which differ)."""
  differ = {name for name in labeler_lib.WEIGHTS if terms_a[name] != terms_b[name]}
  if not differ:
    raise ValueError("pair_difference of responses with equal quality terms")
  content, form = bool(differ & _CONTENT_TERMS), bool(differ - _CONTENT_TERMS)
  return "both" if content and form else "content" if content else "form"


def reward_model_check(rankings_file: str, model, params, tokenizer, *,
                       max_prompt_len: int, max_response_len: int,
                       per_device_batch_size: int) -> dict:
  """How often the reward model and the recorded (noisy) ranks order a pair of responses
  as the labeler's noiseless latent quality does, on world rankings.

  Pairs whose latent qualities are equal are left out; `ranks_vs_noiseless` counts only
  pairs the recorded ranks do not tie. Responses are read as stopped (rankings carry no
  stop flag; the reward model scores them with the stop token appended).
  `by_difference` splits the reward model's pairs by which of the labeler's terms tell
  them apart (see `PAIR_DIFFERENCES`): a reward model that orders `form` pairs but not
  `content` pairs rewards dropping filler and cannot teach PPO to answer right.
  """
  rankings, metas = [], []
  for record in formats.read_examples("prompts", rankings_file):  # one read: prompt + meta
    fields = record.meta or {}
    rankings.append(formats.parse_ranking({"prompt": record.prompt, **fields},
                                          record.source))
    missing = [k for k in ("task", "items") if k not in fields]
    if missing:
      raise ValueError(f"{record.source}: field {missing[0]!r} missing; the reward model "
                       "check needs world rankings, which carry their task fields")
    metas.append(world_lib.task_meta(fields))
  pairs = [(r.prompt, response) for r in rankings for response in r.responses]
  scores = scoring.score_pairs(
      model, params, tokenizer, pairs, max_prompt_len=max_prompt_len,
      max_response_len=max_response_len, per_device_batch_size=per_device_batch_size)
  rm_right, ranks_right = [], []
  by_difference = {name: [] for name in PAIR_DIFFERENCES}
  start = 0
  for ranking, meta in zip(rankings, metas):
    k = ranking.k
    terms = [labeler_lib.quality_terms(meta, r, True) for r in ranking.responses]
    latent = [labeler_lib.weighted_quality(t) for t in terms]
    score, ranks = scores[start:start + k], ranking.ranks
    start += k
    for a, b in itertools.combinations(range(k), 2):
      if latent[a] == latent[b]:
        continue
      truth = latent[a] > latent[b]
      right = (score[a] > score[b]) == truth
      rm_right.append(right)
      by_difference[pair_difference(terms[a], terms[b])].append(right)
      if ranks[a] != ranks[b]:
        ranks_right.append((ranks[a] < ranks[b]) == truth)
  return {"file": rankings_file, "pairs": len(rm_right),
          "rm_vs_noiseless": float(np.mean(rm_right)) if rm_right else None,
          "ranks_vs_noiseless": float(np.mean(ranks_right)) if ranks_right else None,
          "untied_rank_pairs": len(ranks_right),
          "by_difference": {
              name: {"pairs": len(right),
                     "rm_vs_noiseless": float(np.mean(right)) if right else None}
              for name, right in by_difference.items()}}


# ---------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------


def _world_labeler(config: ml_collections.ConfigDict) -> labeler_lib.Labeler:
  """The labeler the world was written with (its calibrated noise is in world.json)."""
  marker = epath.Path(config.world_dir) / "world.json"
  if marker.exists():
    scale = json.loads(marker.read_text()).get("labeler_noise_scale")
    if scale is not None:
      return labeler_lib.Labeler(float(scale))
  return world_lib.WorldConfig.from_dict(config.world.to_dict()).labeler()


def check_config(config: ml_collections.ConfigDict) -> dict[str, str]:
  policies = parse_policies(config.policies)
  names = list(policies) + ([config.few_shot.name] if config.few_shot.base else [])
  if config.few_shot.base and config.few_shot.name in policies:
    raise ValueError(f"config.few_shot.name={config.few_shot.name!r} is also in "
                     "config.policies")
  if config.baseline not in policies:
    raise ValueError(f"config.baseline={config.baseline!r} is not one of config.policies "
                     f"({list(policies)})")
  if config.reference and config.reference not in policies:
    raise ValueError(f"config.reference={config.reference!r} is not one of "
                     f"config.policies ({list(policies)})")
  if config.judge not in ("labeler", "reward_model"):
    raise ValueError(f"config.judge={config.judge!r}: use 'labeler' or 'reward_model'")
  if config.best_of_n < 0 or config.best_of_n & (config.best_of_n - 1):
    raise ValueError(f"config.best_of_n={config.best_of_n}: use 0 (off) or a power of two")
  if config.best_of_n and config.judge != "labeler":
    raise ValueError("config.best_of_n needs config.judge='labeler' (it compares the reward "
                     "model's picks with the labeler's); set config.best_of_n=0")
  if config.judge == "reward_model" and not config.reward_model:
    raise ValueError("config.judge='reward_model' needs config.reward_model (an RM export)")
  if len(names) < 2:
    raise ValueError("config.policies: name at least two policies (one is the baseline)")
  return policies


def evaluate_policies(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Answers, judges and measures; writes results.json, responses.jsonl and the report.

  Returns the results dict (also `summary.json`, so a pipeline rerun skips it).
  """
  t0 = time.time()
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  policies = check_config(config)
  baseline_path = policies[config.baseline]
  tokenizer = models.load_tokenizer(config.tokenizer or baseline_path)
  encoder = tokenize_lib.Encoder(tokenizer)
  use_labeler = config.judge == "labeler"
  files = prompt_files(config)
  prompts = read_prompts(files, need_meta=use_labeler, limit=config.num_prompts)
  metas = [world_lib.task_meta(p.meta) for p in prompts] if use_labeler else None
  logging.info("evaluate: %d prompts from %s; %d policies", len(prompts), files,
               len(policies) + bool(config.few_shot.base))

  generation = Generation(
      max_new_tokens=config.max_response_len, temperature=config.temperature,
      top_k=config.top_k, top_p=config.top_p, greedy=config.greedy,
      stop_token_id=encoder.eos_id, pad_token_id=encoder.pad_id)
  programs = Programs(generation)
  per_device = config.per_device_batch
  judge_prompts = policy_lib.encode_prompts([p.prompt for p in prompts], encoder,
                                            config.max_prompt_len)

  # --- What every policy is measured against --------------------------------------------
  reference = None
  if config.reference:
    ref_model, ref_params = load_causal_lm(policies[config.reference])
    reference = (ref_model, parallel.replicate(ref_params))
  reward = None
  if config.reward_model:
    rm_model, rm_params = models.from_pretrained(config.reward_model)
    if not isinstance(rm_model, models.ScalarHeadModel):
      raise ValueError(f"config.reward_model={config.reward_model!r} is a causal LM, not "
                       "a reward model (no score head)")
    reward = (rm_model, parallel.replicate(rm_params))
  text_file = config.pretrain_file
  if not text_file and config.world_dir:
    world_text = epath.Path(config.world_dir) / "pretrain" / "validation.jsonl"
    text_file = str(world_text) if world_text.exists() else ""
  held_out_text = (text_batches(text_file, tokenizer, config.max_text_len, per_device,
                                config.num_text_batches) if text_file else None)

  # --- Answers and measurements, one checkpoint load per policy ------------------------
  def policy_params(name, path):
    """(model, replicated params); the reference policy's are already loaded."""
    if reference is not None and name == config.reference:
      return reference
    model, params = load_causal_lm(path)
    return model, parallel.replicate(params)

  def run_policy(name, path, prompt_arrays, few_shot=False):
    model, rparams = policy_params(name, path)
    run = answer_prompts(name, path, model, rparams, programs=programs, tokenizer=tokenizer,
                         encoder=encoder, prompt_arrays=prompt_arrays,
                         per_device=per_device, seed=config.seed, few_shot=few_shot)
    measure(run, model, rparams, programs=programs, judge_prompts=judge_prompts,
            per_device=per_device, reference=reference, reward=reward,
            text_batches_=held_out_text)
    return run

  runs: dict[str, PolicyRun] = {}
  for name, path in policies.items():
    runs[name] = run_policy(name, path, judge_prompts)
  if config.few_shot.base:
    shots_file = config.few_shot.examples_file or str(
        epath.Path(config.world_dir) / "sft" / "train.jsonl")
    prefix = few_shot_prefix(formats.read_examples("demonstrations", shots_file),
                             config.few_shot.num_shots, tokenizer.eos_token,
                             config.seed)
    few_shot_prompts = policy_lib.encode_prompts(
        [f"{prefix} {p.prompt}" for p in prompts], encoder, config.few_shot.max_prompt_len)
    runs[config.few_shot.name] = run_policy(config.few_shot.name, config.few_shot.base,
                                            few_shot_prompts, few_shot=True)

  # --- Judging -------------------------------------------------------------------------
  baseline = runs[config.baseline]
  labeler = _world_labeler(config) if use_labeler else None
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
        entry["labeler"] = win_rate(labeler_outcomes(labeler, metas, run, baseline,
                                                     config.seed))
      if run.rm_scores is not None:
        entry["rm_judged"] = win_rate(score_outcomes(run.rm_scores, baseline.rm_scores))
      headline = entry["labeler"] if use_labeler else entry["rm_judged"]
      entry["win_rate"], entry["win_rate_ci95"] = headline["win_rate"], headline["ci95"]
    if use_labeler:
      entry.update(task_table(metas, run))
    results["policies"][name] = entry

  if use_labeler:
    results["reference_answers"] = reference_answers(metas, labeler, baseline, config.seed)
  if use_labeler and config.best_of_n:
    model, rparams = policy_params(config.baseline, baseline_path)
    candidates = []
    for j in range(config.best_of_n):
      candidate = answer_prompts(f"{config.baseline}/candidate_{j}", baseline_path, model,
                                 rparams, programs=programs, tokenizer=tokenizer,
                                 encoder=encoder, prompt_arrays=judge_prompts,
                                 per_device=per_device, seed=config.seed)
      measure(candidate, model, rparams, programs=programs, judge_prompts=judge_prompts,
              per_device=per_device, reference=None, reward=reward, text_batches_=None)
      candidates.append(candidate)
    results["best_of_n"] = best_of_n(candidates, metas, labeler, baseline, config.seed)
  if use_labeler and reward is not None and config.get("rankings_file"):
    results["reward_model_check"] = reward_model_check(
        config.rankings_file, rm_model, rm_params, tokenizer,
        max_prompt_len=config.max_prompt_len, max_response_len=config.max_response_len,
        per_device_batch_size=per_device)

  # --- Outputs -------------------------------------------------------------------------
  results["samples"] = [
      {"prompt": prompts[i].prompt,
       "responses": {name: run.texts[i] for name, run in runs.items()}}
      for i in _spread(len(prompts), config.num_sample_texts)]
  results["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    records = ({"prompt": p.prompt, **({"meta": p.meta} if p.meta else {}),
                "responses": {name: run.texts[i] for name, run in runs.items()},
                "stopped": {name: bool(run.stopped[i]) for name, run in runs.items()}}
               for i, p in enumerate(prompts))
    formats.write_jsonl(str(workdir / "responses.jsonl"), records)
    checkpoint_lib.save_json(workdir / "results.json", results)
    from jaxrlhf.eval import report  # pylint: disable=g-import-not-at-top
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
  print(f"\n[evaluate] win rate against {results['baseline']} "
        f"({results['judge']}, {results['num_prompts']} prompts, ties count half)",
        flush=True)
  for name in results.get("policy_order") or results["policies"]:
    entry = results["policies"][name]
    if entry["win_rate"] is None:
      rate = "  (baseline)        "
    else:
      lo, hi = entry["win_rate_ci95"]
      rate = f"{entry['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]"
    kl, nll = entry["kl_from_reference"], entry["pretrain_nll"]
    extra = []
    if "likert" in entry:
      extra.append(f"Likert {entry['likert']:.2f}, exact {entry['exact_correct']:.2f}")
    if kl is not None:
      extra.append(f"KL {kl:.2f}")
    if nll is not None:
      extra.append(f"text NLL {nll:.3f}")
    print(f"  {name:>14}: {rate}  {', '.join(extra)}", flush=True)
  if results.get("report"):
    print(f"  report: {results['report']}", flush=True)
