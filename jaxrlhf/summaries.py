"""What each stage's `summary.json` says, read in one place: a typed view per stage, and
the one sentence that describes it.

The stages write their summaries as JSON (keys such as `final_eval.eval_ema_score`);
everything that shows them (the pipeline's closing summary on the console, the evaluate
stage's table, the report) reads them through the views below, so a key is named here
and in the stage that writes it, nowhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

NAN = float("nan")


def _get(d: Mapping[str, Any] | None, key: str) -> float:
  value = (d or {}).get(key)
  return NAN if value is None else float(value)


def _evals(summary: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
  return summary.get("initial_eval") or {}, summary.get("final_eval") or {}


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """Pretraining or SFT: validation loss before and after."""
  steps: int
  loss_before: float
  loss_after: float
  seconds: float

  @classmethod
  def from_summary(cls, s: Mapping[str, Any]) -> "LanguageModel":
    first, last = _evals(s)
    return cls(steps=s.get("steps"), loss_before=_get(first, "eval_loss"),
               loss_after=_get(last, "eval_loss"), seconds=_get(s, "seconds"))

  def describe(self) -> str:
    return (f"validation loss {self.loss_before:.3f} → {self.loss_after:.3f} in "
            f"{self.steps} steps")


@dataclasses.dataclass(frozen=True)
class Rankings:
  """The collected rankings: how many, K, and how often two labelers agree."""
  train: int
  validation: int
  k_min: int
  k_max: int
  labeler_agreement: float
  seconds: float

  @classmethod
  def from_summary(cls, s: Mapping[str, Any]) -> "Rankings":
    return cls(train=s["train"]["written"], validation=s["validation"]["written"],
               k_min=s["k_min"], k_max=s["k_max"],
               labeler_agreement=_get(s, "labeler_agreement"), seconds=_get(s, "seconds"))

  def describe(self) -> str:
    return (f"{self.train} training and {self.validation} held-out prompts, "
            f"{self.k_min} to {self.k_max} answers each, ranked; two simulated labelers "
            f"agree on {self.labeler_agreement:.3f} of the held-out pairs of distinct "
            "answers")


@dataclasses.dataclass(frozen=True)
class RewardModel:
  """Held-out pairwise accuracy before and after, against the labelers' agreement."""
  steps: int
  accuracy_before: float
  accuracy_after: float
  comparisons: int
  labeler_agreement: float
  seconds: float

  @classmethod
  def from_summary(cls, s: Mapping[str, Any]) -> "RewardModel":
    first, last = _evals(s)
    return cls(steps=s.get("steps"), accuracy_before=_get(first, "eval_accuracy"),
               accuracy_after=_get(last, "eval_accuracy"),
               comparisons=int(_get(last, "eval_comparisons") if last else 0),
               labeler_agreement=_get(s, "labeler_agreement"), seconds=_get(s, "seconds"))

  def describe(self) -> str:
    return (f"held-out pairwise accuracy {self.accuracy_before:.3f} → "
            f"{self.accuracy_after:.3f} on {self.comparisons} comparisons (two simulated "
            f"labelers agree on {self.labeler_agreement:.3f} of distinct pairs)")


@dataclasses.dataclass(frozen=True)
class PPO:
  """PPO or PPO-ptx: held-out reward-model score, KL from SFT and text NLL."""
  ptx_coef: float
  iterations: int
  score_before: float
  score_after: float
  ema_score: float
  kl: float
  nll_before: float
  nll_after: float
  seconds: float

  @classmethod
  def from_summary(cls, s: Mapping[str, Any]) -> "PPO":
    first, last = _evals(s)
    return cls(ptx_coef=s.get("ptx_coef"), iterations=s.get("iterations"),
               score_before=_get(first, "eval_policy_score"),
               score_after=_get(last, "eval_policy_score"),
               ema_score=_get(last, "eval_ema_score"), kl=_get(last, "eval_policy_kl_k1"),
               nll_before=_get(first, "eval_policy_pretrain_nll"),
               nll_after=_get(last, "eval_policy_pretrain_nll"), seconds=_get(s, "seconds"))

  def describe(self) -> str:
    return (f"held-out mean RM score {self.score_before:.3f} → {self.score_after:.3f} "
            f"(EMA policy {self.ema_score:.3f}), KL to SFT {self.kl:.3f}, pretraining NLL "
            f"{self.nll_before:.3f} → {self.nll_after:.3f} after {self.iterations} "
            "iterations")


@dataclasses.dataclass(frozen=True)
class PolicyRow:
  """One evaluated policy against the baseline."""
  name: str
  win_rate: float | None
  ci95: tuple[float, float] | None
  likert: float | None
  exact_correct: float | None
  hallucination: float | None  # closed-domain: answers holding a symbol not in the input
  kl: float | None
  pretrain_nll: float | None
  alignment_tax: float | None


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The evaluate stage: win rates against the baseline, in the stage's policy order."""
  baseline: str
  judge: str
  num_prompts: int
  rows: tuple[PolicyRow, ...]

  @classmethod
  def from_summary(cls, s: Mapping[str, Any]) -> "Evaluation":
    rows = []
    for name in s.get("policy_order") or s["policies"]:
      e = s["policies"][name]
      ci = e.get("win_rate_ci95")
      rows.append(PolicyRow(
          name=name, win_rate=e.get("win_rate"), ci95=tuple(ci) if ci else None,
          likert=e.get("likert"), exact_correct=e.get("exact_correct"),
          hallucination=e.get("hallucination"), kl=e.get("kl_from_reference"), pretrain_nll=e.get("pretrain_nll"),
          alignment_tax=e.get("alignment_tax")))
    return cls(baseline=s["baseline"], judge=s["judge"], num_prompts=s["num_prompts"],
               rows=tuple(rows))

  def header(self) -> str:
    return (f"win rate against {self.baseline} ({self.judge}, {self.num_prompts} prompts, "
            "ties count half)")

  def lines(self) -> list[str]:
    """One line a policy: the win rate in percent with its 95% interval, then what else
    was measured (Likert, exact answers, KL from the reference, text NLL, alignment tax)."""
    out = []
    for row in self.rows:
      if row.win_rate is None:
        rate = "(baseline)"
      else:
        lo, hi = row.ci95
        rate = f"{100 * row.win_rate:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
      extra = []
      if row.likert is not None:
        extra.append(f"Likert {row.likert:.2f}, exact {row.exact_correct:.2f}")
      if row.hallucination is not None:
        extra.append(f"made up {row.hallucination:.2f}")
      if row.kl is not None:
        extra.append(f"KL {row.kl:.2f}")
      if row.pretrain_nll is not None:
        extra.append(f"text NLL {row.pretrain_nll:.3f}")
      if row.alignment_tax is not None:
        extra.append(f"alignment tax {row.alignment_tax:+.3f}")
      out.append(f"{row.name:>14}: win rate {rate:>20}  {', '.join(extra)}".rstrip())
    return out


def view(name: str, summary: Mapping[str, Any]):
  """The typed view of stage `name`'s summary (pipeline stage names; a stage run on its
  own is recognised by its summary's `stage` field)."""
  kind = summary.get("stage", name) if isinstance(summary, Mapping) else name
  if name == "evaluate" or "policies" in summary:
    return Evaluation.from_summary(summary)
  if kind == "rankings":
    return Rankings.from_summary(summary)
  if kind == "reward_model":
    return RewardModel.from_summary(summary)
  if kind in ("ppo", "ppo_ptx") or "ptx_coef" in summary:
    return PPO.from_summary(summary)
  return LanguageModel.from_summary(summary)
