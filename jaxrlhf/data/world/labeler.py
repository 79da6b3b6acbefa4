"""The simulated labeler: the "human" of the world, for RM rankings and final evaluation.

It reads the hidden task `meta` kept host-side with each prompt, never token ids
the policy could influence beyond its response text. `score` is the paper's 1-7
Likert rating, deterministic: a weighted sum of

  correctness   0.5  partial credit (items in place, or a number off by 1 or 2)
  constraint    0.1  the instruction's form (sorted, K items, upper case, ...)
  stopping      0.2  the response ended with the stop token
  nothing extra 0.2  no words after the answer (half off per extra word)

A response whose first word is not an answer symbol gets 1. For rankings the
labeler rates each response with Gaussian noise on the latent 1-7 value, rounds,
and ranks by rating (equal ratings tie). Responses that read the same (same words
up to the stop, same stop) are one response to the labeler: they get one rating
and always tie. The noise scale is calibrated so that two independent labelers
agree on a configured share of comparisons (the paper's inter-labeler agreement,
about 73%) of distinct policy-like responses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from jaxrlhf.data.world import tasks

WEIGHTS = {"correct": 0.5, "constraint": 0.1, "stopped": 0.2, "concise": 0.2}
# The held-out group (`Labeler.held_out`): labelers who wrote no training data, with
# weights of their own (less on the answer being right, more on its form) and noise
# calibrated for them, as the paper checks its reward models on labelers who made none
# of their training comparisons.
HELD_OUT_WEIGHTS = {"correct": 0.4, "constraint": 0.15, "stopped": 0.2, "concise": 0.25}
EOS_WORD, PAD_WORD = "<eos>", "<pad>"


def read_response(response: str, stopped: bool | None = None) -> tuple[list[str], bool]:
  """Words of a decoded response, cut at the first <eos>, and whether it stopped.

  `stopped=None` means: stopped iff the text holds an <eos>.
  """
  words = [w for w in response.split() if w != PAD_WORD and w != "<bos>"]
  if EOS_WORD in words:
    return words[:words.index(EOS_WORD)], True
  return words, bool(stopped)


def reading(response: str, stopped: bool | None = None) -> tuple[tuple[str, ...], bool]:
  """What the labeler reads of a response: two responses with equal readings are one."""
  words, stopped = read_response(response, stopped)
  return tuple(words), stopped


def _leading_answer(words: Sequence[str]) -> list[str]:
  answer = []
  for word in words:
    if word not in tasks.ANSWER_SYMBOLS:
      break
    answer.append(word)
  return answer


def answer_words(response: str, stopped: bool | None = None) -> list[str]:
  """The answer as the labeler reads it: the leading run of answer symbols."""
  return _leading_answer(read_response(response, stopped)[0])


def quality_terms(meta: dict[str, Any], response: str, stopped: bool | None = True
                  ) -> dict[str, float]:
  """Each term of the latent quality in [0, 1], unweighted (keys as in WEIGHTS).

  All four are 0 for a response whose first word is not an answer symbol.
  """
  words, stopped = read_response(response, stopped)
  answer = _leading_answer(words)
  if not answer:
    return dict.fromkeys(WEIGHTS, 0.0)
  extra = len(words) - len(answer)
  return {"correct": float(tasks.correctness(meta, answer)),
          "constraint": float(tasks.follows_constraint(meta, answer)),
          "stopped": float(stopped),
          "concise": 1.0 - min(extra, 2) / 2}


def metadata(meta: dict[str, Any], response: str, stopped: bool | None = True
             ) -> dict[str, Any]:
  """What the labeler records of one response, as the paper's labelers did beside
  their rating: the 1-7 Likert rating (without noise) and, for a closed-domain task,
  whether the answer makes up a symbol the input does not hold (None otherwise)."""
  return {"likert": score(meta, response, stopped),
          "hallucination": tasks.hallucinated(meta, answer_words(response, stopped))}


def weighted_quality(terms: dict[str, float],
                     weights: Mapping[str, float] | None = None) -> float:
  """Latent quality in [0, 1] from `quality_terms`, with `weights` (the training
  labelers' WEIGHTS by default); see the module docstring."""
  weights = WEIGHTS if weights is None else weights
  return sum(weights[name] * value for name, value in terms.items())


def quality(meta: dict[str, Any], response: str, stopped: bool | None = True,
            weights: Mapping[str, float] | None = None) -> float:
  """Latent quality in [0, 1]; see the module docstring for the weights."""
  return weighted_quality(quality_terms(meta, response, stopped), weights)


def _likert(latent: np.ndarray | float) -> np.ndarray:
  return np.clip(np.floor(np.asarray(latent) + 0.5), 1, 7).astype(np.int32)


def latent_score(meta: dict[str, Any], response: str, stopped: bool | None = True,
                 weights: Mapping[str, float] | None = None) -> float:
  return 1.0 + 6.0 * quality(meta, response, stopped, weights)


def score(meta: dict[str, Any], response: str, stopped: bool | None = True) -> int:
  """The 1-7 Likert rating of a response, without noise."""
  return int(_likert(latent_score(meta, response, stopped)))


def score_from_terms(terms: dict[str, float]) -> int:
  """`score` of the response whose `quality_terms` these are."""
  return int(_likert(1.0 + 6.0 * weighted_quality(terms)))


def ranks_from_ratings(ratings: Sequence[float]) -> list[int]:
  """Dense ranks, 0 for the best rating; equal ratings share a rank."""
  distinct = sorted(set(ratings), reverse=True)
  return [distinct.index(r) for r in ratings]


def _agreement_from_latents(latents: np.ndarray, noise: np.ndarray, scale: float) -> float:
  """latents [pairs, 2]; noise [2 labelers, pairs, 2] standard normal (one draw for both
  sides of a pair of identical responses)."""
  ratings = _likert(latents[None] + scale * noise)  # [labelers, pairs, 2]
  prefer = np.sign(ratings[..., 0] - ratings[..., 1])  # [labelers, pairs]
  return float(np.mean(prefer[0] == prefer[1]))


def sample_policy_like_response(meta: dict[str, Any], rng: np.random.Generator
                                ) -> tuple[str, bool]:
  """A (response, stopped) of the kinds a partly trained policy emits."""
  right = tasks.answer(meta)
  kind = rng.choice(6, p=[0.35, 0.15, 0.2, 0.1, 0.1, 0.1])
  if kind == 0:
    return " ".join(right), True
  if kind == 1:
    return " ".join(right) + " " + tasks.FILLERS[int(rng.integers(len(tasks.FILLERS)))], True
  if kind == 2:
    return " ".join(tasks.corrupt(meta, right, rng)), True
  if kind == 3:  # rambles on in web-text style and never stops
    other = tasks.sample_instance(tasks.TASKS[int(rng.integers(len(tasks.TASKS)))], rng)
    return " ".join(right) + " . " + tasks.web_statement(other), False
  if kind == 4:
    return " ".join(right[:max(1, len(right) - 1)]), bool(rng.random() < 0.5)
  symbols = tasks.LETTERS + tasks.DIGITS
  n = int(rng.integers(1, 5))
  return " ".join(symbols[i] for i in rng.integers(0, len(symbols), size=n)), True


def reference_comparisons(num_pairs: int, seed: int) -> list[tuple[dict, tuple[str, bool], tuple[str, bool]]]:
  """Pairs of distinct policy-like responses to random world prompts (labelers compare
  different outputs), for calibration and tests."""
  rng = np.random.default_rng([seed, 7349])
  pairs = []
  for _ in range(num_pairs):
    meta = tasks.sample_instance(tasks.TASKS[int(rng.integers(len(tasks.TASKS)))], rng)
    first = sample_policy_like_response(meta, rng)
    second = sample_policy_like_response(meta, rng)
    while reading(*second) == reading(*first):
      second = sample_policy_like_response(meta, rng)
    pairs.append((meta, first, second))
  return pairs


@functools.lru_cache(maxsize=16)
def calibrate_noise_scale(agreement: float, seed: int = 0, num_pairs: int = 20000,
                          weights: tuple[tuple[str, float], ...] = ()) -> float:
  """Noise scale at which two labelers with `weights` (() = WEIGHTS) agree on
  `agreement` of reference comparisons."""
  pairs = reference_comparisons(num_pairs, seed)
  w = dict(weights) or None
  return noise_scale_for_agreement(
      agreement, [(latent_score(m, *a, weights=w), latent_score(m, *b, weights=w))
                  for m, a, b in pairs], seed)


def noise_scale_for_agreement(agreement: float, latent_pairs: Sequence[tuple[float, float]],
                              seed: int = 0, identical: Sequence[bool] | None = None) -> float:
  """Bisection on the noise scale; common random numbers keep agreement monotone enough.

  `identical[i]` marks a pair of responses that read the same: one rating for both.
  """
  latents = np.asarray(latent_pairs, np.float64)
  noise = np.random.default_rng([seed, 1]).standard_normal((2,) + latents.shape)
  if identical is not None:
    same = np.asarray(identical, bool)
    noise[:, same, 1] = noise[:, same, 0]
  ceiling = _agreement_from_latents(latents, noise, 0.0)
  if not 0.0 < agreement <= ceiling:
    raise ValueError(f"agreement {agreement} is out of reach; noiseless labelers agree "
                     f"on {ceiling:.3f} of these comparisons")
  low, high = 0.0, 20.0
  for _ in range(40):
    middle = (low + high) / 2
    if _agreement_from_latents(latents, noise, middle) > agreement:
      low = middle
    else:
      high = middle
  return (low + high) / 2


@dataclasses.dataclass(frozen=True)
class Labeler:
  """A noisy labeler. Draw independent labelers by passing independent rngs.

  `weights` (name, weight) pairs replace WEIGHTS for a labeler group of its own (the
  held-out labelers); empty: the training labelers'.
  """
  noise_scale: float
  weights: tuple[tuple[str, float], ...] = ()

  @property
  def weight_map(self) -> dict[str, float]:
    return dict(self.weights) or WEIGHTS

  @classmethod
  def calibrated(cls, agreement: float = 0.73, seed: int = 0) -> Labeler:
    """Calibrated on `reference_comparisons`, policy-like responses of every quality."""
    return cls(calibrate_noise_scale(float(agreement), int(seed)))

  @classmethod
  def held_out(cls, agreement: float = 0.73, seed: int = 1) -> Labeler:
    """A labeler of the held-out group: HELD_OUT_WEIGHTS, its noise calibrated so that
    two of them agree on `agreement` of the reference comparisons."""
    weights = tuple(HELD_OUT_WEIGHTS.items())
    return cls(calibrate_noise_scale(float(agreement), int(seed), weights=weights),
               weights=weights)

  @classmethod
  def calibrated_on(cls, comparisons: Sequence[tuple[dict, tuple[str, bool], tuple[str, bool]]],
                    agreement: float = 0.73, seed: int = 0) -> Labeler:
    """Calibrated on given (meta, (a, stopped), (b, stopped)) comparisons, e.g. real samples."""
    latents = [(latent_score(m, *a), latent_score(m, *b)) for m, a, b in comparisons]
    identical = [reading(*a) == reading(*b) for _, a, b in comparisons]
    return cls(noise_scale_for_agreement(agreement, latents, seed, identical))

  def score(self, meta: dict[str, Any], response: str, stopped: bool | None = True) -> int:
    return int(_likert(latent_score(meta, response, stopped, self.weight_map)))

  def ratings(self, meta: dict[str, Any], responses: Sequence[str], rng: np.random.Generator,
              stopped: Sequence[bool | None] | None = None) -> list[int]:
    """Noisy 1-7 ratings of each response; responses that read the same share one."""
    stopped = [True] * len(responses) if stopped is None else list(stopped)
    readings = [reading(r, s) for r, s in zip(responses, stopped)]
    first = {}  # reading -> its first (response, stopped), in order of appearance
    for key, response, stop in zip(readings, responses, stopped):
      first.setdefault(key, (response, stop))
    latents = np.array([latent_score(meta, r, s, self.weight_map)
                        for r, s in first.values()])
    noisy = _likert(latents + self.noise_scale * rng.standard_normal(latents.shape))
    rating = dict(zip(first, noisy.tolist()))
    return [rating[key] for key in readings]

  def rank(self, meta: dict[str, Any], responses: Sequence[str], rng: np.random.Generator,
           stopped: Sequence[bool | None] | None = None) -> list[int]:
    """K-way ranking, rank 0 best, ties where the noisy ratings are equal."""
    return ranks_from_ratings(self.ratings(meta, responses, rng, stopped))

  def prefer(self, meta: dict[str, Any], response_a: str, response_b: str,
             rng: np.random.Generator, stopped_a: bool | None = True,
             stopped_b: bool | None = True) -> float:
    """1 if a is rated higher, 0.5 for a tie, 0 otherwise: one win-rate judgement."""
    a, b = self.ratings(meta, [response_a, response_b], rng, [stopped_a, stopped_b])
    return 1.0 if a > b else 0.5 if a == b else 0.0


def measure_agreement(labeler: Labeler, comparisons: Sequence[tuple[dict, tuple[str, bool],
                                                                   tuple[str, bool]]],
                      seed: int = 1) -> float:
  """Share of comparisons on which two independent labelers give the same verdict.

  A verdict is 'a better', 'b better' or 'tie'; the two labelers draw their noise
  from independent streams.
  """
  first, second = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
  agree = 0
  for meta, (a, stopped_a), (b, stopped_b) in comparisons:
    verdicts = [labeler.prefer(meta, a, b, rng, stopped_a, stopped_b) for rng in (first, second)]
    agree += verdicts[0] == verdicts[1]
  return agree / len(comparisons)
