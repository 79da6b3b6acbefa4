"""What a stage measures on held-out data, behind one interface.

An evaluator is an object with `run(rstate, step) -> {name: float}`: it measures the
replicated train state `rstate` at `step` (writing texts to TensorBoard if it samples)
and returns scalars to log. A stage lists its evaluators once; `as_eval_fn` gives the
host loop (`train_lib.run_loop`) the function it calls every `eval_every` steps, and
`run_all` runs a list of them for the evaluation before training.

  evaluators = [HeldOutNLL(eval_step_p, data.eval_batches), LearningRate(schedule)]
  result = stage.train(..., eval_fn=as_eval_fn(evaluators))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np

from jaxrlhf import parallel
from jaxrlhf import scoring
from jaxrlhf import train_lib


class Evaluator(Protocol):

  def run(self, rstate: Any, step: int) -> dict[str, float]:
    ...


def run_all(evaluators: Sequence[Evaluator], rstate: Any, step: int) -> dict[str, float]:
  """Every evaluator's scalars, in list order; two evaluators may not name one metric."""
  metrics: dict[str, float] = {}
  for evaluator in evaluators:
    out = evaluator.run(rstate, step)
    clash = sorted(set(out) & set(metrics))
    if clash:
      raise ValueError(f"{type(evaluator).__name__} reports {clash}, which an earlier "
                       "evaluator already reported")
    metrics.update(out)
  return metrics


def as_eval_fn(evaluators: Sequence[Evaluator]) -> Callable[[Any, int], dict[str, float]]:
  return lambda rstate, step: run_all(evaluators, rstate, step)


def _params(rstate: Any) -> Any:
  return rstate.params


@dataclasses.dataclass
class HeldOutNLL:
  """Token-weighted NLL and perplexity of held-out text (`eval_loss`, `eval_perplexity`,
  `eval_tokens`), of `params(rstate)`; `names` keeps and renames some of them."""
  eval_step_p: Callable
  batches: Callable[[], list[dict]]
  params: Callable[[Any], Any] = _params
  names: dict[str, str] | None = None

  def run(self, rstate, step):
    del step
    metrics = scoring.evaluate_nll(self.eval_step_p, self.params(rstate), self.batches())
    if self.names is None:
      return metrics
    return {new: metrics[old] for old, new in self.names.items()}


@dataclasses.dataclass
class LearningRate:
  """The learning rate the schedule gives at the step."""
  schedule: Callable[[int], Any]

  def run(self, rstate, step):
    del rstate
    return {"learning_rate": float(self.schedule(step))}


@dataclasses.dataclass
class GreedySamples:
  """Answers to a few held-out prompts, written to TensorBoard as text; no scalars."""
  sampler: Any  # policy_lib.Sampler
  prompts: list[str]
  writer: Any  # metrics.MetricWriter

  def run(self, rstate, step):
    if self.prompts:
      texts = self.sampler.sample(rstate.params, self.prompts, jax.random.key(step)).texts
      self.writer.write_texts(step, {f"sample_{i}": f"{p!r} -> {t!r}"
                                     for i, (p, t) in enumerate(zip(self.prompts, texts))})
    return {}


@dataclasses.dataclass
class RankingAccuracy:
  """Held-out pairwise accuracy, loss and score gap of a reward model over all the
  comparisons of the held-out rankings (`eval_accuracy`, `eval_comparisons`, ...)."""
  eval_step_p: Callable
  batches: Callable[[], list[dict]]

  def run(self, rstate, step):
    del step
    return ranking_metrics(self.eval_step_p, rstate.params, self.batches())


def ranking_metrics(eval_step_p, rparams, batches) -> dict[str, float]:
  """Means over every held-out comparison of pmapped `reward_model.rm_eval_step`."""
  sums = None
  for batch in batches:
    out = parallel.fetch(eval_step_p(rparams, train_lib.put_batch(batch)))
    sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
  if sums is None:
    return {}
  return {f"eval_{name}": float(s.total / max(s.count, 1.0)) for name, s in sums.items()} | {
      "eval_comparisons": float(sums["accuracy"].count)}
