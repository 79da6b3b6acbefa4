"""How policies' answers are judged: win rates, the labeler's verdicts, the reward model's.

`win_rate` turns per-prompt outcomes (1 win, 0.5 tie, 0 loss) into a rate with its 95%
interval; `labeler_outcomes` and `score_outcomes` give those outcomes against the
baseline's answers, from the world's labeler or from reward-model scores. Also the
labeler's Likert and exact-correctness table (`task_table`), best-of-n and the fixed
reference answers, and `reward_model_check`: does the reward model order responses as the
labeler's noiseless quality does.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np

from jaxrlhf import scoring
from jaxrlhf.data import formats
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.data.world import tasks as tasks_lib
from jaxrlhf.data.world import world as world_lib
from jaxrlhf.eval import policy_runs

# Two-sided 95% quantile of the standard normal.
Z_95 = 1.959963984540054


# ---------------------------------------------------------------------------------------
# Win rates.
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
# The labeler's judgements.
# ---------------------------------------------------------------------------------------


def labeler_outcomes(labeler: labeler_lib.Labeler, metas: list[dict],
                     run: policy_runs.PolicyRun, baseline: policy_runs.PolicyRun,
                     seed: int) -> np.ndarray:
  """One labeler judgement per prompt: 1 the policy's answer is rated higher, 0.5 tie."""
  return judge_answers(labeler, metas, run.name, run.texts, run.stopped, baseline, seed)


def judge_answers(labeler: labeler_lib.Labeler, metas: list[dict], name: str,
                  texts: list[str], stopped, baseline: policy_runs.PolicyRun,
                  seed: int) -> np.ndarray:
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


def best_of_n(candidates: list[policy_runs.PolicyRun], metas: list[dict],
              labeler: labeler_lib.Labeler, baseline: policy_runs.PolicyRun,
              seed: int) -> dict:
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
      row = {"win_rate": outcome["win_rate"], "ci95": outcome["ci95"],
             "correct": float(np.mean([terms[i][j]["correct"] for i, j in enumerate(pick)])),
             # gold: the labeler's noiseless latent quality (1-7) of the picks
             "gold": float(np.mean([1.0 + 6.0 * latent[i, j] for i, j in enumerate(pick)]))}
      if "reward_model" in pickers:  # proxy: the reward model's score of the picks
        row["rm_score"] = float(np.mean([pickers["reward_model"][i, j]
                                         for i, j in enumerate(pick)]))
      rows.append(row)
    out[picker] = rows
  return out


def reference_answers(metas: list[dict], labeler: labeler_lib.Labeler,
                      baseline: policy_runs.PolicyRun, seed: int) -> dict:
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


def task_table(metas: list[dict], run: policy_runs.PolicyRun) -> dict:
  """Mean Likert rating (the labeler's, without rating noise) and exact correctness,
  overall and per instruction type, and the mean of each term of the labeler's latent
  quality (where a policy's wins come from: right answers, or only shorter ones)."""
  terms = [labeler_lib.quality_terms(m, t, bool(s))
           for m, t, s in zip(metas, run.texts, run.stopped)]
  likert = np.array([labeler_lib.score_from_terms(t) for t in terms], np.float64)
  # Exactly right is full correctness credit (a response with no answer gets 0).
  correct = np.array([t["correct"] == 1.0 for t in terms], np.float64)
  # Closed-domain hallucination: the share of answers to tasks whose answer must come
  # from the input that hold a symbol the input does not (None where no such task).
  made_up = [tasks_lib.hallucinated(m, labeler_lib.answer_words(t, bool(s)))
             for m, t, s in zip(metas, run.texts, run.stopped)]
  tasks = np.array([m["task"] for m in metas])
  per_task = {}
  for task in sorted(set(tasks.tolist())):
    rows = tasks == task
    per_task[task] = {"likert": float(likert[rows].mean()),
                      "exact_correct": float(correct[rows].mean()), "n": int(rows.sum())}
    if task in tasks_lib.CLOSED_DOMAIN_TASKS:
      per_task[task]["hallucination"] = float(np.mean(
          [made_up[i] for i in np.flatnonzero(rows)]))
  closed = [h for h in made_up if h is not None]
  return {"likert": float(likert.mean()), "exact_correct": float(correct.mean()),
          "hallucination": float(np.mean(closed)) if closed else None,
          "hallucination_n": len(closed),
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


# ---------------------------------------------------------------------------------------
# The reward model against the labeler.
# ---------------------------------------------------------------------------------------


def reward_model_check(rankings_file: str, model, params, tokenizer, *,
                       max_prompt_len: int, max_response_len: int,
                       per_device_batch_size: int,
                       held_out: labeler_lib.Labeler | None = None, seed: int = 0) -> dict:
  """How often the reward model and the recorded (noisy) ranks order a pair of responses
  as the labeler's noiseless latent quality does, on world rankings.

  Pairs whose latent qualities are equal are left out; `ranks_vs_noiseless` counts only
  pairs the recorded ranks do not tie. Responses are read as stopped (rankings carry no
  stop flag; the reward model scores them with the stop token appended).
  `by_difference` splits the reward model's pairs by which of the labeler's terms tell
  them apart (see `PAIR_DIFFERENCES`): a reward model that orders `form` pairs but not
  `content` pairs rewards dropping filler and cannot teach PPO to answer right.

  With a `held_out` labeler (one of a group that made no training data), the same
  responses are ranked again by it, and the reward model's accuracy on those rankings
  (`rm_vs_held_out_labelers`) stands beside its accuracy on the recorded ranks of the
  training labelers (`rm_vs_training_labelers`), both over the pairs each does not tie.
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
  vs_training, vs_held_out = [], []
  rng = np.random.default_rng([seed, 4521])
  by_difference = {name: [] for name in PAIR_DIFFERENCES}
  start = 0
  for ranking, meta in zip(rankings, metas):
    k = ranking.k
    terms = [labeler_lib.quality_terms(meta, r, True) for r in ranking.responses]
    latent = [labeler_lib.weighted_quality(t) for t in terms]
    score, ranks = scores[start:start + k], ranking.ranks
    start += k
    other = None if held_out is None else held_out.rank(meta, ranking.responses, rng)
    for a, b in itertools.combinations(range(k), 2):
      if ranks[a] != ranks[b]:
        vs_training.append((score[a] > score[b]) == (ranks[a] < ranks[b]))
      if other is not None and other[a] != other[b]:
        vs_held_out.append((score[a] > score[b]) == (other[a] < other[b]))
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
          "rm_vs_training_labelers": float(np.mean(vs_training)) if vs_training else None,
          "training_labeler_pairs": len(vs_training),
          "rm_vs_held_out_labelers": float(np.mean(vs_held_out)) if vs_held_out else None,
          "held_out_labeler_pairs": len(vs_held_out),
          "by_difference": {
              name: {"pairs": len(right),
                     "rm_vs_noiseless": float(np.mean(right)) if right else None}
              for name, right in by_difference.items()}}


def gold_vs_proxy(histories: dict[str, list[dict]], results: dict) -> dict:
  """The reward model's score (proxy) and the labeler's noiseless latent quality (gold,
  1-7) against KL from SFT: at each held-out evaluation of each PPO run, and for the
  reward model's best of n SFT answers (KL: the best-of-n bound). Where the two part, the
  policy is optimising the reward model past what it knows (Gao et al. 2022)."""
  out = {}
  for stage, rows in histories.items():
    points = [{"iteration": r["step"], "kl": r["eval_policy_kl_k1"],
               "proxy": r["eval_policy_score"], "gold": r["eval_policy_gold"]}
              for r in rows if all(isinstance(r.get(k), (int, float)) for k in (
                  "eval_policy_kl_k1", "eval_policy_score", "eval_policy_gold"))]
    if points:
      out[stage] = points
  best = results.get("best_of_n") or {}
  picks = best.get("reward_model") or []
  if picks and all("rm_score" in p for p in picks):
    out["best_of_n"] = [{"n": n, "kl": kl, "proxy": p["rm_score"], "gold": p["gold"]}
                        for n, kl, p in zip(best["n"], best["kl_bound"], picks)]
  return out
