"""jaxrlhf/evaluators.py: one interface for what the stages measure on held-out data."""

import dataclasses

import pytest

from jaxrlhf import evaluators


@dataclasses.dataclass
class _Fixed:
  metrics: dict
  seen: list = dataclasses.field(default_factory=list)

  def run(self, rstate, step):
    self.seen.append((rstate, step))
    return dict(self.metrics)


def test_run_all_merges_in_list_order_and_refuses_a_metric_reported_twice():
  a, b = _Fixed({"eval_loss": 1.0}), _Fixed({"learning_rate": 0.5})
  eval_fn = evaluators.as_eval_fn([a, b])
  out = eval_fn("state", 7)
  assert list(out) == ["eval_loss", "learning_rate"] and out["learning_rate"] == 0.5
  assert a.seen == b.seen == [("state", 7)]
  with pytest.raises(ValueError, match=r"_Fixed reports \['eval_loss'\]"):
    evaluators.run_all([a, _Fixed({"eval_loss": 2.0})], "state", 8)


def test_learning_rate_and_renamed_nll(monkeypatch):
  assert evaluators.LearningRate(lambda step: 0.1 * step).run(None, 3) == {
      "learning_rate": pytest.approx(0.3)}
  calls = []

  def fake_nll(step_fn, params, batches):
    calls.append((step_fn, params, batches))
    return {"eval_loss": 2.0, "eval_perplexity": 7.4, "eval_tokens": 10.0}

  monkeypatch.setattr(evaluators.scoring, "evaluate_nll", fake_nll)

  @dataclasses.dataclass
  class State:
    params: str
    ema_params: str

  state = State("p", "e")
  plain = evaluators.HeldOutNLL("step", lambda: ["batch"])
  assert plain.run(state, 0) == {"eval_loss": 2.0, "eval_perplexity": 7.4,
                                 "eval_tokens": 10.0}
  ema = evaluators.HeldOutNLL("step", lambda: ["batch"], params=lambda s: s.ema_params,
                              names={"eval_loss": "eval_ema_pretrain_nll"})
  assert ema.run(state, 0) == {"eval_ema_pretrain_nll": 2.0}
  assert [c[1] for c in calls] == ["p", "e"]
